"""Tokenizers (tpa_jax.data.tokenizers): byte, GPT-2 / tiktoken, Hugging Face, names and manifests."""
import sys

import pytest

from tpa_jax.data import ByteTokenizer, HFTokenizer, TiktokenTokenizer, load_tokenizer
from tpa_jax.data.tokenizers import iter_chunks, tokenizer_slug
from _data_util import one_line, toy_tiktoken


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓ 𝔘'\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(ids) == text
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    assert (tok.vocab_size, tok.eot_id, tok.name) == (256, None, "byte")
    again = load_tokenizer(tok.to_manifest())
    assert isinstance(again, ByteTokenizer) and again.to_manifest() == tok.to_manifest()
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError) as e:
        load_tokenizer("nope")
    assert "nope" in one_line(e)


def test_gpt2_tokenizer_clear_error_without_files(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Max retries\nexceeded")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError) as e:
        TiktokenTokenizer("gpt2")
    msg = one_line(e)
    assert "gpt2" in msg and "TIKTOKEN_CACHE_DIR" in msg


def test_gpt2_tokenizer_when_available():
    try:
        tok = load_tokenizer("gpt2")
    except RuntimeError as e:
        assert "gpt2" in str(e) and "\n" not in str(e)
        pytest.skip("GPT-2 BPE files not cached and no network")
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode(tok.encode("héllo <|endoftext|>")) == "héllo <|endoftext|>"
    assert 50256 not in tok.encode("<|endoftext|>")  # plain text, never the special token


def test_tiktoken_wrapper(monkeypatch):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: toy_tiktoken())
    tok = load_tokenizer("gpt2")
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    text = "héllo <|endoftext|> world"
    assert tok.encode(text) == list(text.encode())  # the literal special string stays plain text
    assert tok.decode(tok.encode(text)) == text
    assert [a.tolist() for a in tok.encode_batch(["ab", "c"])] == [[97, 98], [99]]


def test_hf_tokenizer_without_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError) as e:
        HFTokenizer(tmp_path / "tokenizer.json")
    assert "tokenizers" in one_line(e)


def test_slugs_and_chunks():
    assert tokenizer_slug("byte") == "byte" and tokenizer_slug(ByteTokenizer()) == "byte"
    assert tokenizer_slug("tiktoken:cl100k base") == "tiktoken-cl100k-base"
    hf = tokenizer_slug("hf:/some/where/tokenizer.json")
    assert hf.startswith("hf-") and len(hf) == 13 and hf == tokenizer_slug("hf:/some/where/tokenizer.json")
    assert list(iter_chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iter_chunks([], 3)) == []


def test_tokenizer_identity_kind_vocab_and_source(tmp_path):
    from tpa_jax.data import tokenizer_identity, tokenizer_mismatch

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"model": 1}')
    b.write_text('{"model": 2}')
    hf_a = {"kind": "hf", "name": f"hf:{a}", "path": str(a), "vocab_size": 300}  # an older manifest: no sha256
    hf_a2 = {"kind": "hf", "name": "hf:elsewhere/tokenizer.json", "path": "/nonexistent/tokenizer.json",
             "sha256": tokenizer_identity(hf_a)[2], "vocab_size": 300}  # the same file, moved
    hf_b = {"kind": "hf", "name": f"hf:{b}", "path": str(b), "vocab_size": 300}
    assert tokenizer_mismatch(hf_a, hf_a2) is None
    assert "tokenizer.json sha256" in tokenizer_mismatch(hf_a, hf_b)
    gpt2 = {"kind": "tiktoken", "name": "gpt2", "encoding": "gpt2", "vocab_size": 50257}
    assert "encoding 'gpt2' vs 'cl100k_base'" in tokenizer_mismatch(gpt2, dict(gpt2, encoding="cl100k_base"))
    assert tokenizer_mismatch({"kind": "byte", "name": "byte", "vocab_size": 256}, ByteTokenizer().to_manifest()) is None
