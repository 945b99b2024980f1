"""The block-wise approximate KV cache (ldm.sampling.cache) and the entropy-bounded commit rule,
on tiny random BERT and ModernBERT models with left-padded batches."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM,
                          ModernBertConfig, ModernBertForMaskedLM)

from ldm.errors import ConfigError
from ldm.sampling import SamplerSettings, generate, sampler_model
from ldm.sampling.cache import BlockCache, check_cache_family
from ldm.sampling.model import true_positions

PAD, UNK, CLS, EOS, MASK = 0, 1, 2, 3, 4
IDS = dict(mask_id=MASK, eos_id=EOS, special_ids=[PAD, UNK, CLS, EOS, MASK], pad_id=PAD)
VOCAB = 48
FAMILIES = ("bert", "modernbert")


def tiny(family: str) -> torch.nn.Module:
    """A random tiny masked LM; ModernBERT with a window of 8 so sliding layers matter."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, initializer_range=0.3)
    if family == "bert":
        return BertForMaskedLM(BertConfig(type_vocab_size=1, **common)).eval()
    return ModernBertForMaskedLM(ModernBertConfig(
        local_attention=8, global_attn_every_n_layers=2, pad_token_id=PAD, bos_token_id=None,
        eos_token_id=None, cls_token_id=None, sep_token_id=None, **common)).eval()


def prompts(seed: int = 1):
    """Three prompts of different lengths (so the batch is left-padded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB, (n,), generator=g).tolist() for n in (20, 13, 17)]


def padded_batch(seed: int = 2, padded: bool = True):
    ids = torch.randint(5, VOCAB, (3, 40), generator=torch.Generator().manual_seed(seed))
    attn = torch.ones_like(ids)
    if padded:
        attn[0, :9], attn[1, :3] = 0, 0
    return ids.masked_fill(attn == 0, PAD), attn


def plain(model):
    """The uncached reference: the whole model, full logits, no access to its layers."""
    fn = sampler_model(model)
    return lambda ids, attn: fn(ids, attn)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_cache_refreshed_every_step_gives_the_uncached_logits(family, padded):
    model = tiny(family)
    ids, attn = padded_batch(padded=padded)
    reference = plain(model)
    cache = BlockCache(model, "dual", 3, refresh_every_step=True)
    rows = torch.arange(3)
    with torch.inference_mode():
        for step, (lo, hi) in enumerate([(24, 32), (24, 32), (32, 40)]):
            ids[:, lo + step] = 5 + step  # the canvas changes between steps, as when committing
            got = cache.logits(ids, attn, rows, lo, hi, block=lo // 8)
            want = reference(ids, attn)[:, lo:hi]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_partial_forward_on_an_unchanged_canvas_equals_the_full_forward(family, mode, padded):
    # Only the kept keys/values differ between a partial and a full step; on an unchanged canvas
    # they are exact, so this checks rotary positions, sliding windows and padding of the path.
    model = tiny(family)
    ids, attn = padded_batch(padded=padded)
    want = plain(model)(ids, attn)[:, 24:32]
    cache = BlockCache(model, mode, 3)
    rows = torch.arange(3)
    with torch.inference_mode():
        cache.logits(ids, attn, rows, 24, 32, block=0)
        full_positions = cache.positions
        got = cache.logits(ids, attn, rows, 24, 32, block=0)
    assert cache.positions - full_positions < full_positions  # it was a partial step
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_steps_of_all_rows_and_of_a_subset_read_the_same_kept_entries(family, mode):
    # All rows in order are computed in place on the kept tensors, a subset on a gathered copy;
    # both must see the entries of the block's full forward, not a previous step's.
    model = tiny(family)
    ids, attn = padded_batch()
    want = plain(model)(ids, attn)[:, 24:32]
    cache = BlockCache(model, mode, 3)
    everyone, finished = torch.arange(3), torch.tensor([0, 2])
    with torch.inference_mode():
        cache.logits(ids, attn, everyone, 24, 32, block=0)
        moved = ids.clone()
        moved[:, 24:32] = 6  # a step that changes the block, then the canvas as it was
        cache.logits(moved, attn, everyone, 24, 32, block=0)
        whole = cache.logits(ids, attn, everyone, 24, 32, block=0)
        cache.logits(moved[finished], attn[finished], finished, 24, 32, block=0)
        part = cache.logits(ids[finished], attn[finished], finished, 24, 32, block=0)
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(part, want[finished], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_retiring_finished_rows_changes_no_logits_of_the_rows_left(family, mode):
    # Retired rows' entries are dropped so the rows left run in place; they must read the same
    # entries as a cache that gathers them at every step, in this block and the next.
    model = tiny(family)
    ids, attn = padded_batch()
    gathers, retires = BlockCache(model, mode, 3), BlockCache(model, mode, 3)
    everyone, left = torch.arange(3), torch.tensor([0, 2])
    moved = ids.clone()
    moved[:, 26] = 6
    with torch.inference_mode():
        for cache in (gathers, retires):
            cache.logits(ids, attn, everyone, 24, 32, block=0)
        retires.retire(torch.tensor([False, True, False]))
        assert retires.keys[0].shape[0] == 2 and retires.slot.tolist() == [0, -1, 1]
        for canvas, lo, block in ((moved, 24, 0), (ids, 24, 0), (moved, 32, 1), (ids, 32, 1)):
            want = gathers.logits(canvas[left], attn[left], left, lo, lo + 8, block=block)
            got = retires.logits(canvas[left], attn[left], left, lo, lo + 8, block=block)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        before = retires.full_forwards
        back = retires.logits(ids[[1]], attn[[1]], torch.tensor([1]), 32, 40, block=1)
    assert retires.full_forwards == before + 1  # a retired row asked for again: start over
    torch.testing.assert_close(back, plain(model)(ids, attn)[[1], 32:40], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_keys_are_stored_in_the_dtype_autocast_computes_them_in(family):
    # bf16 autocast (as on a GPU): the kept keys/values are bf16 like the attention's inputs,
    # half the memory of float32, and the logits follow the uncached model under autocast.
    model = tiny(family)
    ids, attn = padded_batch()
    cache = BlockCache(model, "dual", 3, refresh_every_step=True)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cache.logits(ids, attn, torch.arange(3), 24, 32, block=0).float()
        want = plain(model)(ids, attn)[:, 24:32].float()
    assert cache.keys[0].dtype == cache.values[0].dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_stale_keys_are_used_until_the_next_block(family):
    model = tiny(family)
    ids, attn = padded_batch()
    cache = BlockCache(model, "dual", 3)
    rows = torch.arange(3)
    with torch.inference_mode():
        cache.logits(ids, attn, rows, 24, 32, block=0)
        changed = ids.clone()
        changed[:, 12] = 7  # a prompt token changes: a dual step does not see it ...
        kept = cache.logits(changed, attn, rows, 24, 32, block=0)
        fresh = cache.logits(changed, attn, rows, 24, 32, block=1)  # ... a new block does
        exact = plain(model)(changed, attn)[:, 24:32]
    assert (kept - exact).abs().max() > 1e-4
    torch.testing.assert_close(fresh, exact, atol=1e-5, rtol=0)


def count_positions(model, family):
    """Count token positions through each layer's first projection and through the decoder."""
    counts = {"layers": 0, "head": 0}
    layers = model.base_model.encoder.layer if family == "bert" else model.base_model.layers
    first = [layer.attention.self.query if family == "bert" else layer.attn.Wqkv
             for layer in layers]

    def add(key):
        return lambda module, args, out: counts.__setitem__(
            key, counts[key] + args[0].shape[:-1].numel())

    for module in first:
        module.register_forward_hook(add("layers"))
    model.get_output_embeddings().register_forward_hook(add("head"))
    return counts, len(first)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,recomputed", [("prefix", 16), ("dual", 8)])
def test_a_cached_step_computes_only_its_positions(family, mode, recomputed):
    model = tiny(family)
    ids, attn = padded_batch()  # 3 rows of 40; block [24, 32)
    counts, layers = count_positions(model, family)
    cache = BlockCache(model, mode, 3)
    with torch.inference_mode():
        cache.logits(ids, attn, torch.arange(3), 24, 32, block=0)
        assert counts == {"layers": layers * 3 * 40, "head": 3 * 8}
        rows = torch.tensor([0, 2])  # row 1 has finished
        cache.logits(ids[rows], attn[rows], rows, 24, 32, block=0)
    # prefix: the block and the 8 positions after it; dual: the block alone; 2 rows.
    assert counts["layers"] - layers * 3 * 40 == layers * 2 * recomputed
    assert counts["head"] - 3 * 8 == 2 * 8


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_the_sampler_runs_the_head_on_the_blocks_still_masked_positions_only(family, cache):
    model = tiny(family)
    counts, _ = count_positions(model, family)
    result = generate(sampler_model(model), prompts(),
                      SamplerSettings(max_new_tokens=16, steps=16, block_length=8,
                                      early_stop=False, cache=cache), **IDS)
    # one commit per row and step: 3 rows x (8 + 7 + ... + 1) masked positions in each of the
    # 2 blocks, not 3 rows x 8 at each of the 16 calls
    assert result.nfe == 16
    assert counts["head"] == 2 * 3 * sum(range(1, 9))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_sampler_with_cache_refreshed_every_step_answers_as_uncached(family, mode, cfg_scale):
    model = tiny(family)
    settings = dict(max_new_tokens=16, steps=16, block_length=8, threshold=0.2,
                    cfg_scale=cfg_scale)
    want = generate(plain(model), prompts(), SamplerSettings(**settings), **IDS)
    got = generate(sampler_model(model), prompts(),
                   SamplerSettings(cache=mode, cache_refresh_every_step=True, **settings), **IDS)
    assert got.tokens == want.tokens
    assert got.nfe == want.nfe
    assert [s.committed.tolist() for s in got.history] == \
        [s.committed.tolist() for s in want.history]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_sampler_answers_the_same_whether_finished_rows_are_retired_or_gathered(
        family, mode, monkeypatch):
    model = tiny(family)
    with torch.no_grad():
        model.get_output_embeddings().bias[EOS] += 2.0  # rows finish at different steps
    settings = SamplerSettings(max_new_tokens=16, steps=16, block_length=8, threshold=0.5,
                               cache=mode)
    held = []
    retire = BlockCache.retire

    def spy(cache, done):
        retire(cache, done)
        held.append(cache.keys[0].shape[0])

    monkeypatch.setattr(BlockCache, "retire", spy)
    retired = generate(sampler_model(model), prompts(), settings, **IDS)
    monkeypatch.setattr(BlockCache, "retire", lambda cache, done: None)
    gathered = generate(sampler_model(model), prompts(), settings, **IDS)
    assert min(held) < 3  # some rows finished early and were retired
    assert retired.tokens == gathered.tokens
    assert [s.committed.tolist() for s in retired.history] == \
        [s.committed.tolist() for s in gathered.history]
    assert retired.nfe == gathered.nfe


@pytest.mark.parametrize("family", FAMILIES)
def test_dual_cache_makes_fewer_flops_than_uncached(family):
    model = tiny(family)
    settings = dict(max_new_tokens=16, steps=16, block_length=8)
    none = generate(sampler_model(model), prompts(), SamplerSettings(**settings), **IDS)
    dual = generate(sampler_model(model), prompts(), SamplerSettings(cache="dual", **settings),
                    **IDS)
    assert none.nfe == dual.nfe == 16  # one token per step (llada), 2 blocks
    assert dual.flops < 0.6 * none.flops
    assert all(len(t) == 16 for t in dual.tokens)


def test_cache_is_refused_for_a_family_without_support():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1,
                                                   n_heads=2, hidden_dim=64)).eval()
    with pytest.raises(ConfigError, match=r"sampler.cache='dual'.*bert, modernbert.*'distilbert'"):
        generate(sampler_model(model), prompts(),
                 SamplerSettings(max_new_tokens=8, steps=8, block_length=8, cache="dual"), **IDS)
    check_cache_family("none", "distilbert")  # uncached sampling works for every family
    with pytest.raises(ConfigError, match="sampler.cache='full'.*none, prefix, dual"):
        check_cache_family("full", "bert")


@pytest.mark.parametrize("bad,match", [
    (dict(rule="entropy_bound", gamma=0.0), "sampler.gamma=0.0 must be > 0"),
    (dict(rule="entropy_bound", gamma=None), "sampler.gamma=None must be > 0"),
    (dict(rule="entropy_bound", gamma=0.5, threshold=0.9), "threshold=0.9 and rule='entropy_bound'"),
    (dict(rule="commit", gamma=0.5), "sampler.gamma=0.5 is used only by"),
    (dict(cache="full"), "sampler.cache='full' is unknown"),
])
def test_bad_entropy_bound_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        SamplerSettings(max_new_tokens=8, steps=8, block_length=8, **bad)


class Peaked:
    """Fake model: answer position j gets a distribution with probability p[j] on token 10 + j
    and the rest spread evenly, so its entropy is known."""

    def __init__(self, peaks):
        self.peaks = torch.tensor(peaks, dtype=torch.float64)

    def __call__(self, ids, attn):
        n = len(self.peaks)
        probs = ((1 - self.peaks) / (VOCAB - 1))[:, None].expand(n, VOCAB).clone()
        probs[torch.arange(n), 10 + torch.arange(n)] = self.peaks
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        logits[:, -n:] = probs.log().float()
        return logits


def entropy(p: float) -> float:
    rest = (1 - p) / (VOCAB - 1)
    return float(-(p * torch.log(torch.tensor(p)) + (VOCAB - 1) * rest * torch.log(torch.tensor(rest))))


def test_entropy_bound_commits_the_most_confident_while_summed_entropy_stays_under_gamma():
    peaks = [0.99, 0.5, 0.999, 0.9, 0.3, 0.95, 0.6, 0.98]
    by_confidence = sorted(range(8), key=lambda j: -peaks[j])
    cumulative = torch.tensor([entropy(peaks[j]) for j in by_confidence]).cumsum(0)
    gamma = float(cumulative[3] + cumulative[4]) / 2  # room for exactly the four surest
    settings = dict(max_new_tokens=8, steps=8, block_length=8, rule="entropy_bound")
    result = generate(Peaked(peaks), [[7, 8, 9]], SamplerSettings(gamma=gamma, **settings), **IDS)
    first = result.history[0].committed[0]
    assert first.nonzero().squeeze(1).tolist() == sorted(by_confidence[:4])
    assert result.tokens[0] == [10 + j for j in range(8)]
    tight = generate(Peaked(peaks), [[7, 8, 9]], SamplerSettings(gamma=1e-6, **settings), **IDS)
    assert tight.nfe == 8  # always at least one commit per step, never more beyond the bound


def test_the_cache_runs_the_head_of_the_sampler_model_it_is_given():
    model = tiny("bert")
    sampled = sampler_model(model)
    assert BlockCache(sampled, "dual", 3).head is sampled.head
    ids, attn = padded_batch(padded=True)
    full = sampled(ids, attn)[:, 10:20]
    assert torch.allclose(sampled.block_logits(ids, attn, 10, 20), full, atol=1e-5)


def test_true_positions_count_from_the_first_real_token():
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert true_positions(attn).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_sample_task_runs_with_dual_cache_and_entropy_bound(tmp_path):
    from test_sample_task import make_export, sample

    export = make_export(tmp_path / "chat", chat=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king spoke\nwho walked in the field?\n")
    _, records = sample(tmp_path, export, f"prompts_file={prompts}", "sampler=entropy_bound",
                        "sampler.cache=dual", "sampler.gamma=0.3")
    assert len(records) == 2
    assert records[0]["sampler"]["cache"] == "dual"
    assert all(r["nfe"] >= 1 for r in records)
