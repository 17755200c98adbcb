#!/usr/bin/env python3
"""Builds the demo model's corpus (train.txt, valid.txt) from the text dumped by
scripts/fetch_corpus.sh: the King James Bible (as the `bible` program prints it) and Jane
Austen's six novels (from r-cran-janeaustenr's R lazy-load database). Python stdlib only;
the output is a pure function of the inputs.

Format of both files: documents (one per Bible chapter, one per novel chapter, plus each
novel's title page) separated by two blank lines ("\\n\\n\\n"); no document contains an empty
line pair. A Bible chapter is "Genesis 1", a blank line, then one verse per line (verse numbers
dropped). A novel chapter is "<Title>", blank, "<chapter heading>", blank, then its paragraphs
(the Project Gutenberg line wrapping undone) separated by single blank lines.

Split: within each source, document i goes to valid.txt when i % 20 == 19, else to train.txt
(every 20th chapter held out, about 5%).
"""
import argparse, hashlib, os, re, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rdata  # noqa: E402

AUSTEN = [  # R variable, title (publication order)
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]
CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([0-9]+|[IVXLC]+)\.?\s*$")
VOLUME = re.compile(r"^\s*(VOLUME|Volume)\s+([0-9]+|[IVXLC]+)\.?\s*$")


def clean(s):
    return re.sub(r"[ \t]+", " ", s).strip()


def kjv_docs(path):
    """Chapters of the `bible -l 100000` dump: 'Book N' header lines, '  V text' verse lines."""
    docs, head, verses = [], None, []
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            if head is None:
                raise SystemExit("%s: verse before any chapter header: %r" % (path, line[:60]))
            verses.append(clean(m.group(2)))
        else:
            if head is not None:
                docs.append(head + "\n\n" + "\n".join(verses))
            head, verses = clean(line), []
    if head is not None:
        docs.append(head + "\n\n" + "\n".join(verses))
    return docs


def paragraphs(lines):
    out, cur = [], []
    for l in lines:
        if l.strip():
            cur.append(l.strip())
        elif cur:
            out.append(clean(" ".join(cur)))
            cur = []
    if cur:
        out.append(clean(" ".join(cur)))
    return out


def austen_docs(rdx, rdb):
    data = rdata.lazyload(rdx, rdb)
    docs = []
    for var, title in AUSTEN:
        lines = [l if l is not None else "" for l in data[var]]
        lines = [l for l in lines if not VOLUME.match(l)]
        parts, head, cur = [], None, []
        for l in lines:
            if CHAPTER.match(l):
                parts.append((head, cur))
                head, cur = clean(l), []
            else:
                cur.append(l)
        parts.append((head, cur))
        for head, body in parts:
            paras = paragraphs(body)
            if not paras:
                continue
            if head is None:  # title page (and Northanger Abbey's advertisement)
                docs.append("\n\n".join(paras))
            else:
                docs.append(title + "\n\n" + head + "\n\n" + "\n\n".join(paras))
    return docs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kjv", required=True, help="output of: bible -l 100000 Gen1:1-Rev22:21")
    ap.add_argument("--austen-rdx", required=True)
    ap.add_argument("--austen-rdb", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=20)
    a = ap.parse_args()
    sources = [("kjv", kjv_docs(a.kjv)), ("austen", austen_docs(a.austen_rdx, a.austen_rdb))]
    train, valid, stats = [], [], []
    for name, docs in sources:
        for d in docs:
            assert "\n\n\n" not in d and d == d.strip(), d[:80]
        v = [d for i, d in enumerate(docs) if i % a.every == a.every - 1]
        t = [d for i, d in enumerate(docs) if i % a.every != a.every - 1]
        train += t
        valid += v
        stats.append("%s: %d documents (%d train, %d valid), %d characters"
                     % (name, len(docs), len(t), len(v), sum(map(len, docs))))
    os.makedirs(a.out, exist_ok=True)
    for fname, docs in (("train.txt", train), ("valid.txt", valid)):
        text = "\n\n\n".join(docs) + "\n"
        with open(os.path.join(a.out, fname), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        b = text.encode("utf-8")
        stats.append("%s: %d documents, %d bytes, %d words, sha256 %s"
                     % (fname, len(docs), len(b), len(text.split()), hashlib.sha256(b).hexdigest()))
    print("\n".join(stats))


if __name__ == "__main__":
    main()
