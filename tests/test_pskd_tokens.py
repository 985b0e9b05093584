"""Token-level PS-KD: loss against hand values with padding, zero gradient on padding, the
previous-epoch snapshot, and a tiny transformers model trained with it (BLEU computed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfkd.losses.pskd import pskd_loss, pskd_token_loss
from selfkd.seq.snapshot import PreviousEpochModel


def _hand_loss(logits, targets, prev, alpha, mask):
    total, n = 0.0, 0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            z = [float(v) for v in logits[b, t]]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            for k in range(V):
                target = (1 - alpha) * (1.0 if k == int(targets[b, t]) else 0.0)
                target += alpha * float(prev[b, t, k])
                total += -target * (z[k] - lse)
            n += 1
    return total / n


def test_token_loss_matches_hand_value_with_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g)
    prev = torch.softmax(torch.randn(2, 3, 4, generator=g), dim=-1)
    targets = torch.tensor([[1, 3, -100], [0, -100, -100]])
    mask = targets != -100
    want = _hand_loss(logits, targets, prev, 0.35, mask.tolist())
    got = pskd_token_loss(logits, targets, prev, 0.35, mask)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # the mask defaults to targets != -100, and pskd_loss dispatches 3-D logits
    assert float(pskd_loss(logits, targets, prev, 0.35)) == pytest.approx(want, rel=1e-6)
    # an explicit 0/1 mask that hides one more token
    mask2 = mask.clone().long()
    mask2[0, 1] = 0
    want2 = _hand_loss(logits, targets, prev, 0.35, mask2.bool().tolist())
    assert float(pskd_token_loss(logits, targets, prev, 0.35, mask2)) == pytest.approx(want2)


def test_padded_positions_get_no_gradient_and_do_not_change_the_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    prev = torch.softmax(torch.randn(2, 4, 5, generator=g), dim=-1)
    targets = torch.tensor([[2, 1, 0, 4], [3, 3, -100, -100]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss = pskd_token_loss(logits, targets, prev, 0.5, mask)
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)
    # garbage in padded positions (logits, prev, targets) changes nothing
    logits2 = logits.detach().clone()
    logits2[~mask] = 1e4
    prev2 = prev.clone()
    prev2[~mask] = 0.0
    targets2 = targets.clone()
    targets2[0, 2:] = 1
    assert float(pskd_token_loss(logits2, targets2, prev2, 0.5, mask)) == pytest.approx(
        float(loss.detach())
    )


def test_alpha_zero_is_token_cross_entropy_and_2d_behaviour_is_unchanged():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[2, 3:] = -100
    prev = torch.softmax(torch.randn(3, 5, 7, generator=g), dim=-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
    assert float(pskd_token_loss(logits, targets, prev, 0.0)) == pytest.approx(float(ce), rel=1e-6)
    z2, y2, p2 = logits[:, 0], targets[:, 0], prev[:, 0]
    assert float(pskd_loss(z2, y2, p2, 0.0)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(z2, y2)), rel=1e-6
    )


def test_mask_that_does_not_match_the_logits_is_a_one_line_error():
    logits = torch.zeros(2, 3, 4)
    prev = torch.full((2, 3, 4), 0.25)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        pskd_token_loss(logits, targets, prev, 0.5, torch.ones(2, 4, dtype=torch.bool))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "padding mask has shape (2, 4) but the logits (2, 3, 4) need B×T = (2, 3)"
    )
    with pytest.raises(ValueError, match=r"^targets must be B×T = \(2, 3\)"):
        pskd_token_loss(logits, targets[:, :2], prev, 0.5)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        pskd_token_loss(logits, targets, prev, 0.5, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="only to token-level"):
        pskd_loss(logits[:, 0], targets[:, 0], prev[:, 0], 0.5, torch.ones(2, dtype=torch.bool))


def test_previous_epoch_model_is_a_frozen_copy_of_the_last_epoch():
    model = torch.nn.Linear(3, 4)
    prev = PreviousEpochModel()
    prev.start_epoch(model, 0)
    assert prev.probs(input=torch.zeros(1, 3)) is None  # epoch 0: one-hot targets
    prev.start_epoch(model, 1)
    x = torch.randn(2, 3)
    want = torch.softmax(model(x), -1).detach()
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the snapshot must not move
    got = prev.probs(input=x)
    assert torch.allclose(got, want)
    assert not any(p.requires_grad for p in prev.model.parameters())
    prev.start_epoch(model, 1)  # same epoch again: no new copy
    assert torch.allclose(prev.probs(input=x), want)
    prev.start_epoch(model, 2)
    assert torch.allclose(prev.probs(input=x), torch.softmax(model(x), -1).detach())


transformers = pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")


def test_bleu_of_identical_and_disjoint_text():
    from selfkd.seq.bleu import corpus_bleu

    refs = ["t1 t2 t3 t4 t5", "t6 t7 t8 t9"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["x y z w v", "q r s u"], refs) == pytest.approx(0.0)


@pytest.mark.parametrize("method", ["ce", "ls", "pskd"])
def test_tiny_transformer_trains_on_a_synthetic_corpus_and_reports_bleu(tmp_path, method):
    from selfkd.seq.translate import load_seq_config, run

    cfg = load_seq_config(
        None,
        [
            f"method.name={method}",
            "name=tiny",
            "device=cpu",
            "data.n_train=24",
            "data.n_test=6",
            "data.words=6",
            "data.max_len=4",
            "model.d_model=16",
            "model.layers=1",
            "model.heads=2",
            "model.ffn=16",
            "train.epochs=2",
            "train.batch_size=12",
            "eval.max_new_tokens=6",
        ],
    )
    result = run(cfg, tmp_path, log=lambda line: None)
    assert 0.0 <= result["bleu"] <= 100.0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["bleu"] == result["bleu"] and final["method"] == method
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if method == "pskd":
        assert rows[1]["alpha_t"] == pytest.approx(0.7)


def test_pskd_objective_uses_the_previous_epoch_model_from_epoch_one():
    from selfkd.seq.corpus import WordVocab, collate, encode_pairs, synthetic_parallel
    from selfkd.seq.objective import Seq2SeqObjective, token_ce
    from selfkd.seq.translate import DEFAULTS, build_transformer

    pairs = synthetic_parallel(4, seed=0, words=5, max_len=4)
    vocab = WordVocab([s for p in pairs for s in p])
    batch = collate(encode_pairs(pairs, vocab))
    torch.manual_seed(0)
    sizes = {**DEFAULTS["model"], "d_model": 16, "layers": 1, "heads": 2, "ffn": 16, "dropout": 0}
    model = build_transformer(sizes, vocab.size)
    obj = Seq2SeqObjective("pskd", epochs=2, alpha_T=0.7)
    obj.start_epoch(model, 0)
    loss0, _ = obj(model, batch)
    from selfkd.seq.objective import decoder_inputs

    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_inputs(model, batch["labels"]),
    ).logits
    assert float(loss0.detach()) == pytest.approx(
        float(token_ce(logits, batch["labels"]).detach()), rel=1e-5
    )
    obj.start_epoch(model, 1)  # snapshot == current model: target = 0.3·onehot + 0.7·p
    loss1, terms = obj(model, batch)
    prev = torch.softmax(logits.detach(), -1)
    want = pskd_token_loss(logits, batch["labels"], prev, 0.7)
    assert terms["alpha_t"] == pytest.approx(0.7)
    assert float(loss1.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
