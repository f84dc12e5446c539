"""Exports the word-frequency lists of wordfreq (PyPI wordfreq==3.1.1, data
CC BY-SA 4.0) to plain files for the `words` family: one `<lang>.tsv` per
language with its N most frequent words (`word<TAB>frequency`, most frequent
first) and a `MANIFEST` naming the version, the languages and each file's
word count and SHA-256. Run by scripts/bootstrap.sh once per cache; nothing
is read from the network here (the lists are inside the wheel).

Usage: python export-words.py OUT_DIR [TOP_N]
"""

import hashlib
import importlib.metadata
import os
import sys
import tempfile

import wordfreq

PINNED = "3.1.1"
DEFAULT_TOP_N = 10_000


def words_of(lang, top_n):
    """(word, frequency) for the top_n most frequent words of `lang`.

    wordfreq stores each list as bins of one centibel: bin i holds the
    words of frequency 10^(-i/100). Reading the bins needs no tokenizer
    (word_frequency would, for Chinese and Japanese)."""
    out = []
    for i, bin_words in enumerate(wordfreq.get_frequency_list(lang, wordlist="best")):
        frequency = 10.0 ** (-i / 100.0)
        for word in bin_words:
            if "\t" in word or "\n" in word or not word:
                continue
            out.append((word, frequency))
            if len(out) == top_n:
                return out
    return out


def write_atomically(path, text):
    directory = os.path.dirname(path)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        temporary = f.name
    os.replace(temporary, path)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    top_n = int(sys.argv[2]) if len(sys.argv) == 3 else DEFAULT_TOP_N
    version = importlib.metadata.version("wordfreq")
    if version != PINNED:
        sys.exit(f"wordfreq {version} is installed; the words family is pinned to {PINNED}")
    os.makedirs(out_dir, exist_ok=True)
    manifest = [f"wordfreq\t{version}", f"top_n\t{top_n}"]
    for lang in sorted(wordfreq.available_languages(wordlist="best")):
        words = words_of(lang, top_n)
        text = "".join(f"{w}\t{f:.6e}\n" for w, f in words)
        write_atomically(os.path.join(out_dir, f"{lang}.tsv"), text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        manifest.append(f"language\t{lang}\t{len(words)}\t{digest}")
    # The manifest last: its presence says every list is complete.
    write_atomically(os.path.join(out_dir, "MANIFEST"), "\n".join(manifest) + "\n")
    print(f"exported {len(manifest) - 2} languages × up to {top_n} words to {out_dir}")


if __name__ == "__main__":
    main()
