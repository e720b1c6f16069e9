"""Words a minidiff model does not know, in the app (issue 24 item 10): a Shapes model knows only
its captions' words. A prompt with none of them ("a pink hexagon": only "a" is known) drew what
the empty prompt draws (black squares) under a one-line warning; the page now refuses it with a
message naming the unknown words and the known ones. Unknown words beside known ones: one warning."""

from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")

from minidiff.tools.webapp import AppModel, Settings, WebApp, generate  # noqa: E402

KNOWN = "a, blue, circle, green, orange, purple, red, square, triangle, yellow"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AppModel.load(str(tiny_model_dir), device="cpu")


def test_the_tiny_model_knows_the_shapes_words(model):
    assert ", ".join(w for w in model.pipe.model.tokenizer.vocab if not w.startswith("<")) == KNOWN


@pytest.mark.parametrize("prompt", ["a pink hexagon", "An enormous hexagon", "hexagon"])
def test_a_prompt_of_unknown_words_is_refused_with_the_words_the_model_knows(model, tmp_path, monkeypatch, prompt):
    calls = []
    monkeypatch.setattr(model.pipe, "predict", lambda *args: calls.append(1))
    with pytest.raises(gr.Error) as error:
        list(WebApp(model, tmp_path).generate("txt2img", Settings(prompt, steps=2)))
    message = error.value.message
    unknown = [w for w in prompt.lower().split() if w not in ("a", "an")]
    words = "the word" if len(unknown) == 1 else "the words"
    assert message.startswith(f"this model does not know {words} " + ", ".join(f"'{w}'" for w in unknown))
    assert message.endswith(f"it knows only: {KNOWN}") and "\n" not in message
    assert calls == []  # refused before any sampling


def test_unknown_words_beside_known_ones_are_one_warning_each(model):
    settings = Settings("a pink circle", negative_prompt="a hexagon", steps=2, seed=1)
    result = list(generate(model, "txt2img", settings))[-1]
    assert result.warnings == [  # the page's messages, not the tokenizer's "ignoring words ..." beside them
        f"prompt: ignoring 'pink', unknown to this model; it knows only: {KNOWN}",
        f"negative prompt: ignoring 'hexagon', unknown to this model; it knows only: {KNOWN}"]
    assert len(result.images) == 1


def test_a_prompt_of_known_words_warns_of_nothing(model):
    assert list(generate(model, "txt2img", Settings("a red circle", steps=2)))[-1].warnings == []


def test_sd3_reads_any_words(tiny_sd3, tiny_sd3_dir):
    assert AppModel(tiny_sd3, str(tiny_sd3_dir), "sd3").check_words(Settings("a pink hexagon")) == []
