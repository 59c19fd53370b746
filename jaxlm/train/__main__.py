"""python -m jaxlm.train --config=FILE --workdir=DIR [--config.FIELD=VALUE ...]: pretraining
only (jaxlm.train.loop). Re-running on the same workdir resumes from its latest checkpoint."""

import logging

from jaxlm import cli


def main(argv) -> dict:
    args = cli.parse(argv, "jaxlm.train", __doc__)
    cli.start(args.config)
    from jaxlm.train import loop  # JAX and friends: after the flags are known good
    hooks = None
    if args.config.evaluate.every:  # few-shot scores beside the loss: wired here, not in the loop
        from jaxlm.evaluate import fewshot
        hooks = loop.Hooks(evaluate=fewshot.during_training(args.config),
                           evaluate_every=args.config.evaluate.every)
    summary = loop.train(args.config, args.workdir, hooks=hooks)
    logging.getLogger("jaxlm").info("training done: %s", summary)
    return summary


if __name__ == "__main__":
    cli.run(main)
