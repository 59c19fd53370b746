"""python -m jaxlm.serve --config=FILE (--workdir=DIR | --config.evaluate.params=EXPORT)
[--host=127.0.0.1] [--port=8000] [--api-key=KEY] [--name=NAME] [--config.FIELD=VALUE ...]

Serves a model behind an OpenAI-compatible HTTP API (jaxlm.serve.app): the latest
checkpoint of a training workdir (config.checkpoint.step picks another), a params export,
or a Hugging Face import (its export with the config it generated). A causal model
generates (POST /v1/completions, continuous batching over config.serve.slots); a model with
a class head classifies (POST /v1/classify). Every program is compiled before the server
listens; a model that cannot be loaded stops the command with one line (exit 2). SIGTERM
(or Ctrl-C) stops taking requests and lets running ones finish within
config.serve.shutdown_s, then exits 0. --api-key (or the JAXLM_API_KEY environment
variable) makes every endpoint but /health require `Authorization: Bearer KEY`.
"""

import contextlib
import os
import pathlib
import signal
import socket

import uvicorn

from jaxlm import cli
from jaxlm.errors import ConfigError

FLAGS = [
    cli.Flag("workdir", "a training workdir to serve (its latest checkpoint); not needed with "
             "--config.evaluate.params", "", metavar="DIR"),
    cli.Flag("host", "address to listen on (127.0.0.1: this machine only)", "127.0.0.1",
             metavar="HOST"),
    cli.Flag("port", "port to listen on", "8000", metavar="PORT"),
    cli.Flag("api-key", "require this bearer token (default: $JAXLM_API_KEY; empty: none)", "",
             metavar="KEY"),
    cli.Flag("name", "the model's name in the API (default: jaxlm-<arch>)", "", metavar="NAME"),
]


class Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM or Ctrl-C, once its graceful shutdown is done,
    ends the command with exit code 0 (uvicorn raises the signal again)."""

    @contextlib.contextmanager
    def capture_signals(self):
        stop = lambda signum, frame: setattr(self, "should_exit", True)
        before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


def load(cfg, workdir, name: str = ""):
    """The params jaxlm.evaluate would read (the workdir's checkpoint or the export
    config.evaluate.params) as a Service, every program compiled."""
    import copy
    import logging

    import jax

    from jaxlm import checkpoint, models
    from jaxlm.evaluate.scoring import uses_prefix
    from jaxlm.inference.classify import Classifier
    from jaxlm.inference.engine import Batcher, Engine
    from jaxlm.inference.service import Service
    from jaxlm.setup import build
    setup = build(cfg)
    params, step = checkpoint.load_params(cfg, setup, workdir)
    if cfg.model.scan_layers and setup.family.causal and not cfg.model.num_classes:
        # Decoding runs the blocks unrolled: under jax.lax.scan every step copies each
        # layer's KV cache out of the stacked cache and back (GPT-2 small, 16 slots of
        # 1024 cells, CPU: 0.86 s a step scanned, 0.12 s unrolled).
        cfg = copy.deepcopy(cfg)
        cfg.model.scan_layers = False
        setup = build(cfg)
        params = jax.device_put(models.unstack_blocks(params), setup.param_shardings)
    tok, s = setup.tokenizer, cfg.serve
    service = Service(name=name or f"jaxlm-{cfg.model.arch}", tokenizer=tok,
                      prefix=[tok.eos_id] if uses_prefix(cfg.evaluate.prefix, tok) else [],
                      max_len=cfg.data.seq_len, max_logprobs=s.max_logprobs)
    if cfg.model.num_classes:
        service.classify = Classifier(setup.model, params, tok, setup.mesh, cfg.mesh,
                                      cfg.data.seq_len, pooled=setup.family.pooled)
        service.class_names = tuple(cfg.finetune.class_names) or tuple(
            str(i) for i in range(cfg.model.num_classes))
        service.classify(["warm-up"])
    elif setup.family.causal:
        engine = Engine(setup.model, params, tok, setup.mesh, cfg.mesh, s.slots, s.max_logprobs)
        engine.warm_up()
        service.max_len = engine.max_len
        service.batcher = Batcher(engine, s.max_queue, eos_id=tok.eos_id)
    else:
        raise ConfigError(f"config.model.arch={cfg.model.arch!r} without a class head "
                          "(config.model.num_classes=0) neither generates nor classifies")
    logging.getLogger("jaxlm").info(
        "serving %s (step %s): %s", service.name, step,
        "generation" if service.batcher else f"classes {', '.join(service.class_names)}")
    return service


def main(argv):
    args = cli.parse(argv, "jaxlm.serve", __doc__, workdir=False, flags=FLAGS)
    cfg, flags = args.config, args.flags
    if not flags["workdir"] and not cfg.evaluate.params:
        raise ConfigError("give --workdir=DIR (a training run) or --config.evaluate.params=EXPORT")
    try:
        port = int(flags["port"])
        assert 0 < port < 65536
    except (ValueError, AssertionError):
        raise ConfigError(f"--port={flags['port']}: expected a port number 1-65535") from None
    with socket.socket() as probe:  # a taken port is said now, not after the compiles
        try:
            probe.bind((flags["host"], port))
        except OSError as e:
            raise ConfigError(f"--host={flags['host']} --port={port}: cannot listen there "
                              f"({e.strerror})") from None
    cli.start(cfg)
    from jaxlm.serve.app import make_app
    service = load(cfg, pathlib.Path(flags["workdir"] or "."), flags["name"])
    app = make_app(service, api_key=flags["api-key"] or os.environ.get("JAXLM_API_KEY") or None,
                   shutdown_s=cfg.serve.shutdown_s, max_n=cfg.serve.max_n)
    server = Server(uvicorn.Config(app, host=flags["host"], port=port, log_level="info",
                                   timeout_graceful_shutdown=cfg.serve.shutdown_s))
    server.run()


if __name__ == "__main__":
    cli.run(main)
