"""Fine-tune a BERT on one GLUE task (config.finetune.glue_task): its data, head (one
output for STS-B's regression) and class names come from the task (jaxlm.data.glue), and
the best epoch is picked by the task's official score (MCC, accuracy, F1 and accuracy,
Pearson and Spearman: config.finetune.best_metric=glue).

    python -m jaxlm.finetune --config=configs/bert/glue.py --workdir=runs/glue_mrpc \
        --config.finetune.glue_task=mrpc --config.finetune.glue_dir=GLUE \
        --config.finetune.init=runs/bert_debug
    python -m jaxlm.glue --config=configs/bert/glue.py --workdir=runs/glue \
        --glue-dir=GLUE --lrs=1e-4,3e-4 --seeds=0,1,2 -- --config.finetune.init=runs/bert_debug

GLUE is the folder GLUE's download script leaves (CoLA/, SST-2/, ..., MNLI/, diagnostic/);
without config.finetune.glue_dir the task is read from TFDS glue/TASK prepared in
config.data.data_dir. The model is the debug BERT's shape; for BERT-base take
bert_base.py's model (or hf_bert_base.py with a converted checkpoint) and the paper's
grid: learning rates 2e-5..5e-5, batch 32, 3 epochs.
"""

from debug import get_config as debug_config


def get_config():
    c = debug_config()
    c.finetune.glue_task = "sst2"
    c.model.dropout = 0.1
    c.finetune.update(epochs=3, learning_rate=1e-4, batch_size=32, warmup_ratio=0.1,
                      best_metric="glue")
    c.evaluate.batch_size = 50
    return c
