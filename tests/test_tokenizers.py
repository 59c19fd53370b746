"""Tokenizers: bytes, SentencePiece (trained by the jaxlm command) and GPT-2 BPE (from local
files): round trips, special ids, exact identification in to_dict, the registry, and the
errors."""

import json
import shutil

import numpy as np
import pytest
from data_helpers import lm_batch, memory_cache

from jaxlm import cli
from jaxlm.data import sources, synthetic
from jaxlm.data.tokenizers import ByteTokenizer, Tokenizer, get_tokenizer
from jaxlm.data.tokenizers import __main__ as tokenizer_command
from jaxlm.data.tokenizers.gpt2 import GPT2_EOS, GPT2_FILES, byte_alphabet
from jaxlm.data.tokenizers.spm import SPM_BERT_PIECES, train_sentencepiece
from jaxlm.errors import ConfigError, DataError

TEXTS = ["", "kaz -> KAZ\n", "  two  spaces, a tab\tand\nnew lines\n", "Grüße, 東京 🌍",
         "Bako lives in Tesmor.", "23 + 5 = 28"]


# ----------------------------------------------------------------------------- bytes


def test_round_trip_ascii_and_non_ascii():
    tok = ByteTokenizer()
    for text in ["", "kqz -> zqk\n", "Grüße, 東京 🌍", "\x00\t\n"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_special_ids_are_outside_bytes_and_dropped_on_decode():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    ids = [tok.eos_id] + tok.encode("ab") + [tok.eos_id] + tok.encode("é") + [tok.pad_id]
    assert tok.decode(ids) == "abé"
    assert tok.decode(np.array(ids, np.int32)) == "abé"  # numpy ids, as a model emits them


def test_invalid_utf8_is_replaced_not_raised():
    tok = ByteTokenizer()
    half_of_e_acute = tok.encode("é")[:1]
    assert tok.decode(tok.encode("a") + half_of_e_acute) == "a\ufffd"


def test_out_of_range_id_raises():
    with pytest.raises(ValueError):
        ByteTokenizer().decode([258])


def test_registry_and_description():
    tok = get_tokenizer("byte")
    assert isinstance(tok, Tokenizer) and isinstance(tok, ByteTokenizer)
    desc = tok.to_dict()
    assert json.loads(json.dumps(desc)) == desc
    assert desc == get_tokenizer("byte").to_dict()
    assert desc["vocab_size"] == 258 and desc["name"] == "byte"


def test_unknown_tokenizer_lists_known_names():
    with pytest.raises(ConfigError, match="known tokenizers: .*byte"):
        get_tokenizer("gpt2-bpe")


# ----------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few hundred synthetic documents as one text file and as JSONL."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [synthetic.SyntheticCorpus(synthetic.World(0)).document(i) for i in range(400)]
    (d / "corpus.txt").write_text("".join(docs))
    (d / "corpus.jsonl").write_text("".join(json.dumps({"body": x}) + "\n" for x in docs))
    return d


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm") / "spm.model"
    cli.run(tokenizer_command.main,
            ["train", f"--input={corpus / 'corpus.txt'}", "--vocab_size=400", f"--output={out}"])
    return out


def test_sentencepiece_train_command_special_ids_and_round_trip(spm_model):
    tok = get_tokenizer(f"sentencepiece:{spm_model}")
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (400, 0, 2)
    assert tok.sp.unk_id() == 1
    assert [tok.pieces[p] for p in SPM_BERT_PIECES] == [3, 4, 5]  # reserved for BERT
    assert tok.bert_ids == {"cls": 3, "sep": 4, "mask": 5}
    for text in TEXTS:  # identity normalisation + byte fallback: exact inverse
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("Bako lives in Tesmor.\n")
    assert len(ids) < len("Bako lives in Tesmor.\n")  # learned pieces, not bytes
    assert tok.decode([tok.eos_id] + ids + [tok.pad_id, 3]) == "Bako lives in Tesmor.\n"


def test_sentencepiece_trains_from_jsonl_and_to_dict_follows_the_file(corpus, spm_model, tmp_path):
    a = get_tokenizer(f"sentencepiece:{spm_model}")
    moved = tmp_path / "elsewhere.model"
    shutil.copy(spm_model, moved)
    assert get_tokenizer(f"sentencepiece:{moved}").to_dict() == a.to_dict()  # path-free
    other = train_sentencepiece([str(corpus / "corpus.jsonl")], 420, str(tmp_path / "b.model"),
                                   text_key="body")
    assert other.to_dict() != a.to_dict() and other.to_dict()["vocab_size"] == 420
    shutil.copy(tmp_path / "b.model", moved)  # same path, other model: a checkpoint refuses it
    assert get_tokenizer(f"sentencepiece:{moved}").to_dict() != a.to_dict()
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()
    assert len(a.to_dict()["sha256"]) == 64


def test_sentencepiece_feeds_the_pipeline(spm_model):
    tok = get_tokenizer(f"sentencepiece:{spm_model}")
    docs = [synthetic.SyntheticCorpus(synthetic.World(1)).document(i) for i in range(30)]
    src = sources.TokenSource(memory_cache(docs, tok), tok, 16, True, 0)
    batch = lm_batch(src, 0, 4, tok.vocab_size)
    padding = batch["segments"] == 0
    assert batch["inputs"].max() < 400 and (batch["weights"][padding] == 0).all()
    assert (batch["targets"][padding] == tok.pad_id).all()


def test_sentencepiece_errors(tmp_path, corpus):
    with pytest.raises(ConfigError, match="no SentencePiece model file"):
        get_tokenizer(f"sentencepiece:{tmp_path / 'missing.model'}")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not UTF-8"):
        train_sentencepiece([str(bad)], 300, str(tmp_path / "x.model"))
    with pytest.raises(ConfigError, match="sentencepiece training failed"):
        train_sentencepiece([str(corpus / "corpus.txt")], 100_000, str(tmp_path / "y.model"))


# ----------------------------------------------------------------------------- GPT-2 BPE

MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]


def write_tiny_gpt2(directory, names=("encoder.json", "vocab.bpe"), merges=MERGES):
    """A GPT-2-format vocabulary: the 256 byte tokens, a few merges, <|endoftext|>."""
    to_char = {b: c for c, b in byte_alphabet().items()}
    vocab = {to_char[b]: b for b in range(256)}
    for i, (a, b) in enumerate(merges):
        vocab[a + b] = 256 + i
    vocab[GPT2_EOS] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / names[0]).write_text(json.dumps(vocab))
    (directory / names[1]).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


@pytest.mark.parametrize("names", GPT2_FILES)
def test_gpt2_bpe_from_local_files(tmp_path, names):
    tok = get_tokenizer(f"gpt2:{write_tiny_gpt2(tmp_path / 'v', names)}")
    assert tok.vocab_size == 256 + len(MERGES) + 1 and tok.eos_id == tok.pad_id == tok.vocab_size - 1
    ids = tok.encode("hello world")
    assert ids[:2] == [256 + 2, ord("o")] and 256 + 5 in ids  # "hell", "o", " wor", ...
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.array([tok.eos_id] + ids)) == "hello world"
    assert tok.encode("<|endoftext|>") != [tok.eos_id]  # user text never becomes EOS


def test_gpt2_to_dict_and_errors(tmp_path):
    a = get_tokenizer(f"gpt2:{write_tiny_gpt2(tmp_path / 'a')}")
    b = get_tokenizer(f"gpt2:{write_tiny_gpt2(tmp_path / 'b', merges=MERGES[:4])}")
    assert a.to_dict() != b.to_dict() and a.to_dict()["name"] == "gpt2"
    with pytest.raises(ConfigError, match="holds no GPT-2 vocabulary"):
        get_tokenizer(f"gpt2:{tmp_path / 'nothing'}")
    broken = write_tiny_gpt2(tmp_path / "c")
    (broken / "vocab.bpe").write_text("#version: 0.2\nh e\nw o\n")
    with pytest.raises(ConfigError, match="do not belong together"):
        get_tokenizer(f"gpt2:{broken}")


@pytest.mark.parametrize("spec,match", [("bpe", "unknown tokenizer 'bpe'"),
                                        ("sentencepiece", "expected 'sentencepiece:PATH'"),
                                        ("byte:x", "expected 'byte' or 'byte:bert'")])
def test_bad_tokenizer_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        get_tokenizer(spec)
