"""python -m jaxlm.evaluate --config=FILE --workdir=DIR: few-shot evaluation of the latest
checkpoint in DIR."""

from jaxlm import main

if __name__ == "__main__":
    main.run(train=False)
