"""The draft head (cllm_rt.draft_head): exact output with it active, training that learns, saving bound to the
target's weights, attached by load_model. Float64 tiny models, so rounding cannot flip an argmax."""

import pytest
import torch

import cllm_rt
from cllm_rt import draft_head
from cllm_rt.models import load_model
from cllm_rt.training.draft_head import IGNORE, fit_head, head_accuracy, head_examples
from tiny_models import random_prompts, tiny_model

MAX_NEW = 29


def _random_head(model, depth=3, seed=1, vocab=None, branches=1):
    torch.manual_seed(seed)
    head = draft_head.DraftHead(model.config.hidden_size, depth, vocab).to(torch.float64)
    head.branches = branches
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.5)
    return head


@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("vocab", [None, list(range(3, 101, 2))], ids=["whole-vocab", "some-tokens"])
@pytest.mark.parametrize("drafts", ["auto", ("head",), ("head", "jacobi")])
def test_output_equals_hf_greedy_with_a_head_attached(drafts, vocab, branches):
    model = tiny_model()
    ids, mask = random_prompts(3, [5, 1, 9])
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    draft_head.attach(model, _random_head(model, vocab=None if vocab is None else torch.tensor(vocab),
                                          branches=branches))
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, pad_token_id=0, drafts=drafts)
    assert torch.equal(out.sequences, expected)
    assert out.stats.proposed_by_source["head"] > 0


def test_a_head_with_a_vocabulary_guesses_only_its_tokens():
    model = tiny_model()
    vocab = torch.tensor([7, 11, 50])
    head = _random_head(model, depth=2, vocab=vocab)
    head.branches = 2
    guesses, chances = head.propose(torch.randn(9, 32, dtype=torch.float64), torch.randint(0, 101, (9,)),
                                    model.get_output_embeddings(), model.get_input_embeddings())
    assert guesses.shape == chances.shape == (9, 2, 2) and torch.isin(guesses, vocab).all()
    assert (guesses[:, 0, 0] != guesses[:, 1, 0]).all() and (chances[:, 0, 0] >= chances[:, 1, 0]).all()
    assert ((chances > 0) & (chances <= 1)).all()


def test_each_guess_follows_the_one_before_it_as_in_training():
    """propose (run time, its own guesses) and forward (training, teacher-forced) are one computation: fed
    the guesses propose made, forward's states read out to the same guesses."""
    model = tiny_model()
    head = _random_head(model, depth=4)
    hidden, roots = torch.randn(7, 32, dtype=torch.float64), torch.randint(0, 101, (7,))
    lm_head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    guesses = head.propose(hidden, roots, lm_head, embedding)[0][:, 0]
    follows = torch.cat([roots[:, None], guesses[:, :-1]], 1)
    assert torch.equal(lm_head(head(hidden, embedding(follows))).argmax(-1), guesses)
    other_roots = (roots + 1) % 101  # the same hidden states after other tokens: other guesses
    assert not torch.equal(head.propose(hidden, other_roots, lm_head, embedding)[0][:, 0], guesses)


def _greedy_sequences(model, count=6, length=6, new=24):
    ids, _ = random_prompts(count, [length] * count, seed=3)
    out = model.generate(ids, do_sample=False, max_new_tokens=new, pad_token_id=0)
    return [(row.tolist(), length) for row in out]


def test_training_on_the_targets_own_answers_makes_the_head_right_more_often():
    model = tiny_model()
    sequences = _greedy_sequences(model)
    hidden, roots, labels = head_examples(model, sequences, depth=2)
    # on the target's own greedy answers every label is valid but those past the text's end
    assert (labels[:, 0] != IGNORE).all() and int((labels == IGNORE).sum()) == len(sequences)
    assert len(labels) == len(sequences) * 24  # every answer position but the last, plus the prompt's last
    assert torch.equal(roots, torch.tensor([t for tokens, start in sequences for t in tokens[start:]]))
    before = head_accuracy(draft_head.DraftHead(32, 2).double(), model, hidden.double(), roots, labels)
    head = fit_head(model, hidden, roots, labels, epochs=60, lr=3e-2, batch_size=64)
    after = head_accuracy(head.double(), model, hidden.double(), roots, labels)
    assert after["accuracy_by_depth"][0] > before["accuracy_by_depth"][0] + 0.3
    assert after["leading_right"] > before["leading_right"]


def test_labels_are_cut_where_the_text_leaves_the_targets_greedy_path():
    model = tiny_model()
    tokens, start = _greedy_sequences(model, count=1)[0]
    tokens[start + 5] = (tokens[start + 5] + 1) % 101  # the target would not have written this token
    hidden, roots, labels = head_examples(model, [(tokens, start)], depth=3)
    greedy_until = 5  # positions start-1 .. start+3 predict answer tokens 0..4, still on the greedy path
    assert len(labels) < len(tokens) - start  # the position predicting the changed token is dropped
    assert (labels[:greedy_until - 2] != IGNORE).all()
    assert (labels[greedy_until - 2:greedy_until, 2] == IGNORE).all()  # their depth-3 label crosses the change


def test_load_model_attaches_the_head_and_refuses_one_for_other_weights(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: None)  # tiny models have no tokenizer
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    head = _random_head(model, vocab=torch.tensor([4, 9, 16])).float()
    draft_head.save(head, str(tmp_path), model)
    loaded = load_model(tmp_path)[0]
    attached = draft_head.attached(loaded)
    assert attached is not None and attached.depth == head.depth and torch.equal(attached.vocab, head.vocab)
    assert all(torch.equal(a, b) for a, b in zip(attached.state_dict().values(), head.state_dict().values()))
    assert "cllm_draft_head" not in "".join(loaded.state_dict())  # the model's own weights stay its own
    other = tiny_model(dtype=torch.float32, seed=5)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained for other weights"):
        load_model(tmp_path)


def test_load_model_int8_keeps_the_head_of_the_stored_weights_and_refuses_an_int8_lm_head(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cllm_rt.quantize import Int8Linear

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    draft_head.save(_random_head(model).float(), str(tmp_path), model)
    loaded = load_model(tmp_path, weights="int8")[0]  # the fingerprint is checked on the weights as stored
    assert draft_head.attached(loaded) is not None and type(loaded.model.layers[0].mlp.up_proj) is Int8Linear
    with pytest.raises(ValueError, match="has a draft head, which reads the float LM head"):
        load_model(tmp_path, weights="int8+head")


def test_a_head_of_the_old_format_is_refused_in_one_line(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    path = draft_head.save(_random_head(model).float(), str(tmp_path), model)
    meta = {"format": "1", "depth": "3", "hidden_size": "32", "target": draft_head.target_fingerprint(model)}
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(ValueError, match="not a draft head of format 2 .*retrain it"):
        load_model(tmp_path)


def test_naming_the_head_source_without_a_head_is_refused():
    model = tiny_model()
    ids, mask = random_prompts(1, [4])
    with pytest.raises(ValueError, match="no draft head attached"):
        cllm_rt.generate(model, ids, mask, max_new_tokens=4, pad_token_id=0, drafts=("head",))



def test_cli_train_head_writes_a_model_that_decodes_exactly_with_its_head(tmp_path):
    from cllm_rt.cli import main as cli_main
    from training_fixtures import byte_tokenizer, save_model, tiny_lm, write_jsonl

    source = save_model(tiny_lm(), tmp_path / "model", byte_tokenizer())
    data = write_jsonl(tmp_path / "data.jsonl", [{"question": q, "answer": a} for q, a in
                                                 [("2+2", "4"), ("one more", "two"), ("abc", "def"), ("xyz", "w")]])
    out = str(tmp_path / "with-head")
    cli_main(["train-head", "--model", source, "--data", data, "--out", out, "--prompt-template", "Q: {question}\\nA:",
              "--use-reference", "--max-new-tokens", "12", "--depth", "2", "--epochs", "3"])
    model, tokenizer = load_model(out, dtype="float64")
    assert draft_head.attached(model).depth == 2
    ids = torch.tensor([tokenizer("Q: 2+2\nA:")["input_ids"]])
    expected = model.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=0)
    out = cllm_rt.generate(model, ids, max_new_tokens=20, pad_token_id=0)
    assert torch.equal(out.sequences, expected)
    assert out.stats.proposed_by_source["head"] > 0
