"""Fine-tune a GPT classifier on one GLUE task (config.finetune.glue_task): the debug GPT
reads "EOS a EOS b" and classifies at its last token (jaxlm.data.labelled.Encoder); the
task, its head and its selection metric as in configs/bert/glue.py.

    python -m jaxlm.finetune --config=configs/gpt/glue.py --workdir=runs/gpt_glue_rte \
        --config.finetune.glue_task=rte --config.finetune.glue_dir=GLUE \
        --config.finetune.init=runs/debug
"""

from debug import get_config as debug_config


def get_config():
    c = debug_config()
    c.finetune.glue_task = "sst2"
    c.model.dropout = 0.1
    c.finetune.update(epochs=3, learning_rate=1e-4, batch_size=32, warmup_ratio=0.1,
                      best_metric="glue")
    c.evaluate.update(batch_size=50, tasks=(), num_samples=0)  # a classifier: no few-shot
    return c
