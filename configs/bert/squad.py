"""Fine-tune a BERT for SQuAD (span extraction; v1.1, or v2.0 with unanswerable questions).

    python -m jaxlm.squad --config=configs/bert/squad.py --workdir=runs/squad \
        --config.finetune.init=runs/bert_debug \
        --config.finetune.train_data=train-v1.1.json \
        --config.finetune.validation_data=dev-v1.1.json

For SQuAD v2.0 add --config.finetune.squad_v2=true (and tune
--config.finetune.null_threshold on the dev set). The model is the debug BERT's shape (the
size of a checkpoint to start from: configs/bert/debug.py) with the span head; its windows
are 128 tokens, at most 32 of them question, 64 context tokens apart. For BERT-base take
bert_base.py's model and the paper's settings: seq_len 384, doc_stride 128, learning rate
3e-5 (v1.1) or 5e-5 (v2.0), batch 32, 2 epochs.
"""

from debug import get_config as debug_config


def get_config():
    c = debug_config()
    c.model.update(span_head=True, dropout=0.1)
    c.finetune.update(train_data="", validation_data="", epochs=2, learning_rate=1e-4,
                      batch_size=32, warmup_ratio=0.1, doc_stride=64, max_query_len=32,
                      max_answer_len=30, n_best=20)
    c.evaluate.batch_size = 32
    return c
