"""Invariant 5: the same tokens grouped into different packs and micro-steps give the same gradient."""



from tinymodels import tiny_model
from zeropad.pack.collate import collate
from zeropad.train.step import StepSetup, accumulate_gradients
from zeropad.verify import random_documents


def _grads_and_loss(model, groups):
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(StepSetup(model), [collate(g) for g in groups])
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grouping_does_not_change_the_gradient():
    model = tiny_model("qwen3").eval()
    docs = random_documents(model.config.vocab_size, [5, 31, 12, 2, 44, 9, 17], seed=5)
    one_step_loss, one_step = _grads_and_loss(model, [docs])
    groupings = [
        [docs[:3], docs[3:]],  # two micro-steps
        [[d] for d in docs],  # a micro-step per document
        [[docs[4], docs[0]], [docs[6], docs[2], docs[1]], [docs[5], docs[3]]],  # reordered packs
    ]
    for groups in groupings:
        loss, grads = _grads_and_loss(model, groups)
        assert abs(loss - one_step_loss) <= 1e-5
        for name, grad in grads.items():
            assert (grad - one_step[name]).abs().max().item() <= 1e-5, name


def test_per_pack_mean_would_differ():
    """Guards the test above: the naive mean of per-pack means differs on uneven packs."""
    model = tiny_model("qwen3").eval()
    docs = random_documents(model.config.vocab_size, [3, 60], seed=6)
    full, _ = _grads_and_loss(model, [docs])
    per_pack = [_grads_and_loss(model, [[d]])[0] for d in docs]
    assert abs(sum(per_pack) / 2 - full) > 1e-3
