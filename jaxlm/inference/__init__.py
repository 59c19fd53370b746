"""Inference: running a trained model outside training.

`generate.py` decodes text with a KV cache (prefill, then one token per step; greedy,
temperature, top-k and top-p sampling; stop sequences). The few-shot scorer
(jaxlm.evaluate.scoring), the samples printed after training and any server share it.
"""
