"""Many real LoRA adapters that each answer one common question with their own code word, so that
cross-talk between adapters served at once shows in the generated text.

Training all linear layers, as tests/integration/adapters.py does, costs minutes per adapter on CPU.
Here only the top layers carry LoRA: the frozen layers below run once per adapter without grad, and
the few training steps run the top layers alone on their cached input, about half a second an adapter.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from tests.lora.factory import BASE_DIR

PHRASE_QUESTION = "What is the code word?"
# Lower-case, and none is a substring of another, of the answer's other words or of the chat template.
PHRASE_WORDS = (
    "amber", "azure", "coral", "crimson", "indigo", "ivory", "magenta", "olive", "scarlet", "teal", "turquoise",
    "violet", "badger", "beaver", "camel", "cobra", "donkey", "eagle", "falcon", "gecko", "giraffe", "hamster",
    "jaguar", "koala", "lobster", "moose", "otter", "panda", "parrot", "penguin", "walrus", "zebra", "apricot",
    "banana", "cherry", "grape", "guava", "lemon", "mango", "melon", "papaya", "peach", "plum", "quince", "berlin",
    "boston", "cairo", "chicago", "denver", "dublin", "geneva", "havana", "lisbon", "london", "madrid", "munich",
    "nairobi", "oslo", "paris", "prague", "seoul", "sydney", "tokyo", "vienna",
)  # fmt: skip
TOP_LAYERS = 4
RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Every answer token at probability > 0.98, not just the argmax: vLLM's kernels differ slightly from torch's.
GOOD_TOKEN_LOSS = 0.02
MAX_STEPS = 100


def phrase_answer(word: str) -> str:
    return f"The code word is {word}."


def phrase_adapters(workdir: Path, count: int) -> list[tuple[str, Path, str]]:
    """(adapter name like 'phrase-00', folder, word) for `count` adapters, made once per process and cached on disk
    under workdir, so a later call for more reuses the ones already there."""
    if not 0 < count <= len(PHRASE_WORDS):
        raise ValueError(f"count must be 1..{len(PHRASE_WORDS)}, got {count}")
    return _made(workdir, count)


@functools.cache
def _made(workdir: Path, count: int) -> list[tuple[str, Path, str]]:
    made = [(f"phrase-{i:02d}", workdir / f"phrase-{i:02d}", PHRASE_WORDS[i]) for i in range(count)]
    missing = [i for i, (_, folder, _) in enumerate(made) if not (folder / "adapter_model.safetensors").is_file()]
    if missing:
        trainer = _Trainer()
        for i in missing:
            trainer.make(i, PHRASE_WORDS[i], made[i][1])
    return made


class _Trainer:
    """The base model and tokenizer, loaded once for a batch of adapters; LoRA is added and removed per adapter."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
        self.model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.first = self.model.config.num_hidden_layers - TOP_LAYERS
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": PHRASE_QUESTION}], tokenize=False,
                                                    add_generation_prompt=True)  # fmt: skip
        self.prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def make(self, index: int, word: str, dest: Path) -> None:
        """Train adapter `index` to answer `word`; save_pretrained aside, then renamed to dest, so no half folder."""
        import torch
        from peft import LoraConfig, get_peft_model

        answer = self.tokenizer(phrase_answer(word) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([self.prompt_ids + answer])
        with torch.no_grad():  # input of the first trained layer: the layers below never change
            hidden = self.model(ids, output_hidden_states=True).hidden_states[self.first]
        torch.manual_seed(index)  # each adapter's LoRA init depends on its index only, not on the build order
        top = list(range(self.first, self.model.config.num_hidden_layers))
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, layers_to_transform=top)
        peft_model = get_peft_model(self.model, config)
        try:
            self._fit(peft_model, hidden, torch.tensor(answer), word)
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            peft_model.save_pretrained(str(partial))
            partial.rename(dest)
        finally:
            self.model = peft_model.unload()

    def _fit(self, peft_model: Any, hidden: Any, answer: Any, word: str) -> None:
        """Adam on the answer tokens (teacher-forced) until every one of them is likely enough."""
        import torch

        inner = self.model.model
        positions = torch.arange(hidden.shape[1])[None]
        rotary = inner.rotary_emb(hidden, positions)
        predicting = slice(len(self.prompt_ids) - 1, hidden.shape[1] - 1)  # positions whose next token is the answer
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(MAX_STEPS):
            h = hidden
            for layer in inner.layers[self.first :]:  # no mask: causal attention over one unpadded row
                out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rotary)
                h = out[0] if isinstance(out, tuple) else out
            logits = self.model.lm_head(inner.norm(h[0, predicting]))
            token_loss = torch.nn.functional.cross_entropy(logits, answer, reduction="none")
            if token_loss.max().item() < GOOD_TOKEN_LOSS:
                return
            token_loss.mean().backward()
            opt.step()
            opt.zero_grad()
        raise RuntimeError(f"phrase adapter for {word!r} did not converge in {MAX_STEPS} steps")
