"""python -m jaxlm.train --config=FILE --workdir=DIR [--config.a.b=V ...]: pretraining only."""

from jaxlm import main

if __name__ == "__main__":
    main.run(evaluate=False)
