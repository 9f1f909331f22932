"""The test tier's corpus and tokenizer: generated English, a byte-level BPE, a ChatML template.

The corpus is generated from word lists with a seeded `random.Random`, not read from the Python
standard library, so it is the same on every machine and Python patch release. It is small (about
100 KB) and regular enough that a few hundred training steps make the tiny model write word-like text.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # both imported lazily: the cached-build path needs neither
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

BOS = "<|endoftext|>"  # also ends plain-text documents in the corpus
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # ends every chat turn: the tokenizer's eos, so chat replies stop
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, IM_START, IM_END, PAD)
VOCAB_SIZE = 1024

# ChatML, as SmolLM2/Qwen write it; a system turn only when the caller gives one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Words the test tier's SAE features are built around: common enough in the corpus to become one
# token each, and each tied to one topic so the model learns something about them.
FEATURE_WORDS = ("cat", "moon", "river", "music", "gold", "winter")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "cat dog bird fish horse mouse lion bear fox wolf moon sun star sky cloud rain river lake sea "
    "mountain forest tree flower garden house door window road city village king queen child teacher "
    "doctor farmer baker painter music song book letter story gold silver stone bread apple water "
    "fire winter summer morning night boat train ship bridge castle island"
)
_ADJECTIVES = _words(
    "small big old young happy quiet bright dark warm cold green red blue golden gentle brave tired "
    "clever strange little long early late new kind wild soft loud"
)
_VERBS = _words(
    "saw found liked followed watched visited carried painted heard remembered wanted helped called "
    "opened crossed left made kept"
)
_PLACES = (
    "near the river",
    "in the garden",
    "at night",
    "in the morning",
    "by the sea",
    "under the moon",
    "in the city",
    "on the mountain",
    "in winter",
    "after the rain",
)
_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack")
_TOPIC_FACTS = {  # a few fixed associations, so the feature words carry some meaning
    "cat": ("The cat sleeps on the warm stone.", "A small cat chased the mouse."),
    "moon": ("The moon rises over the dark sea.", "At night the moon is bright."),
    "river": ("The river runs to the sea.", "A boat crossed the long river."),
    "music": ("The music was loud and happy.", "She played music for the king."),
    "gold": ("The king kept his gold in the castle.", "The gold was bright in the sun."),
    "winter": ("In winter the lake is cold.", "The long winter ended in the spring."),
}
_QUESTIONS = (
    "Tell me a story.",
    "What happened next?",
    "Who was there?",
    "Where did they go?",
    "Say something nice.",
    "What do you see?",
    "Hello!",
    "Can you help me?",
)


def _sentence(rng: random.Random) -> str:
    noun, other = rng.choice(_NOUNS), rng.choice(_NOUNS)
    adj = rng.choice(_ADJECTIVES)
    verb = rng.choice(_VERBS)
    place = rng.choice(_PLACES)
    name = rng.choice(_NAMES)
    form = rng.randrange(6)
    if form == 0:
        text = f"the {adj} {noun} {verb} the {other} {place}."
    elif form == 1:
        text = f"{name} {verb} a {adj} {noun}."
    elif form == 2:
        text = f"{place}, the {noun} {verb} the {adj} {other}."
    elif form == 3:
        text = f"the {noun} was {adj} and the {other} was {rng.choice(_ADJECTIVES)}."
    elif form == 4:
        text = f"{name} and {rng.choice(_NAMES)} {verb} the {noun}."
    else:
        return rng.choice(_TOPIC_FACTS[rng.choice(FEATURE_WORDS)])
    return text[0].upper() + text[1:]


def _paragraph(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))


def build_corpus(seed: int = 0, documents: int = 600) -> str:
    """Plain paragraphs and ChatML dialogues, joined with their end markers."""
    rng = random.Random(seed)
    parts: list[str] = []
    for _ in range(documents):
        if rng.random() < 0.5:
            parts.append(_paragraph(rng) + BOS)
        else:
            question = rng.choice(_QUESTIONS)
            parts.append(
                f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{_paragraph(rng)}{IM_END}\n"
            )
    return "".join(parts)


def train_tokenizer(corpus: str) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any text encodes, spaces kept as "Ġ") with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the text between special tokens, so no merge learns a piece of "<|im_end|>".
    pieces = re.split("|".join(map(re.escape, SPECIAL_TOKENS)), corpus)
    tokenizer.train_from_iterator([p for p in pieces if p], trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> PreTrainedTokenizerFast:
    """Wrap for transformers (special tokens, chat template) and write it next to the model."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(path))
    return wrapped
