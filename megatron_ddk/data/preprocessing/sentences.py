"""Sentence splitting for --split-sentences, as Megatron-LM's preprocess_data.py does it: nltk's
punkt model for --lang, texts cut into 1,000,000-character chunks first, and with
--keep-newlines a punkt variant whose sentence-end context keeps the whitespace (newlines) after
a sentence with that sentence instead of dropping it.

nltk is optional (not a megatron-ddk dependency): without it, or without the punkt data, the
error names what to install. Nothing is downloaded (Megatron-LM's tool calls nltk.download at
start; offline machines cannot). Imports nothing from megatron_ddk.
"""

from __future__ import annotations

import os
from typing import Callable, List

_MAX_CHARS = 1_000_000
"""Megatron-LM splits at most this many characters at a time."""

_INSTALL = ("--split-sentences needs nltk and its punkt sentence model for --lang {lang}: "
            "`pip install nltk` then `python -m nltk.downloader punkt punkt_tab` (or point "
            "NLTK_DATA at a folder holding tokenizers/punkt/{lang}.pickle)")


def _punkt(lang: str):
    """The punkt tokenizer for lang: Megatron-LM's pickle path first, then nltk >= 3.9's
    punkt_tab model."""
    import nltk

    folder = os.environ.get("NLTK_DATA")
    rel = os.path.join("tokenizers", "punkt", f"{lang}.pickle")
    url = f"file:{os.path.join(folder, rel)}" if folder else f"nltk:{rel}"
    errors = []
    try:
        return nltk.load(url)
    except (LookupError, OSError, ValueError) as err:  # missing, or pickles refused (>= 3.9)
        errors.append(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
    try:
        from nltk.tokenize.punkt import PunktTokenizer

        return PunktTokenizer(lang)
    except (ImportError, LookupError, OSError, ValueError) as err:
        errors.append(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
    raise ValueError(_INSTALL.format(lang=lang) + f" ({'; '.join(errors)})")


def _keep_newlines(splitter):
    """A punkt tokenizer with the same parameters whose sentence ends take the whitespace that
    follows them (so newlines after a sentence stay in the text)."""
    from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer

    class _NewlineKeepingVars(PunktLanguageVars):
        # As punkt's default, except `\s*` after the sentence end (was `(?=...\s+)`), and the
        # next token may follow immediately.
        _period_context_fmt = r"""
            \S*
            %(SentEndChars)s
            \s*
            (?=(?P<after_tok>
                %(NonWord)s
                |
                (?P<next_tok>\S+)
            ))"""

    return PunktSentenceTokenizer(train_text=splitter._params, lang_vars=_NewlineKeepingVars())


def make_splitter(lang: str = "english", keep_newlines: bool = False) -> Callable[[str], List[str]]:
    """text -> sentences; ValueError naming what to install when nltk or punkt is missing."""
    try:
        import nltk  # noqa: F401
    except ImportError:
        raise ValueError(_INSTALL.format(lang=lang) + " (nltk is not installed)") from None
    splitter = _punkt(lang)
    if keep_newlines:
        splitter = _keep_newlines(splitter)

    def split(text: str) -> List[str]:
        out: List[str] = []
        for start in range(0, len(text), _MAX_CHARS):
            out.extend(splitter.tokenize(text[start:start + _MAX_CHARS]))
        return out

    return split
