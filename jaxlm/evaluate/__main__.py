"""python -m jaxlm.evaluate --config=FILE --workdir=DIR [--config.FIELD=VALUE ...]: few-shot
evaluation (jaxlm.evaluate.fewshot) of the latest checkpoint in DIR (config.checkpoint.step
picks another; config.evaluate.params evaluates a params-only export instead), and of
config.evaluate.harness_tasks, lm-evaluation-harness's own catalog (jaxlm.evaluate.harness)."""

from jaxlm import cli


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.evaluate", __doc__)
    cli.start(args.config)
    from jaxlm.evaluate import fewshot  # JAX and friends: after the flags are known good
    return fewshot.evaluate(args.config, args.workdir)


if __name__ == "__main__":
    cli.run(main)
