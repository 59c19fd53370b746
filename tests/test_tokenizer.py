"""Byte tokenizer round trips, special ids, and the tokenizer registry."""

import json

import numpy as np
import pytest

from jaxlm.data.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer


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
    with pytest.raises(ValueError, match="byte"):
        get_tokenizer("gpt2-bpe")
