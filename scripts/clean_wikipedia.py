#!/usr/bin/env python3
"""Turn a MediaWiki XML dump (.xml or .xml.bz2) into clean WikiText-style text.

Output (in --out-dir):
  wiki.full.txt   every kept article
  wiki.eval.txt   the first articles, up to about half of the characters
  wiki.calib.txt  the remaining articles (no article is in both parts)

Format, close to WikiText-2 "raw": each article starts with a ` = Title = ` line,
section headings become ` = = Name = = ` (one `=` per level), paragraphs are
single lines, and blocks are separated by one empty line.  The text itself is
left as written (no WikiText tokenization such as ` @-@ `), which suits byte-level
BPE tokenizers.  wiki.full.txt == wiki.eval.txt + "\n" + wiki.calib.txt.

Only the Python standard library is used, and the output depends only on the input.
"""

import argparse
import bz2
import html
import os
import re
import sys
import xml.etree.ElementTree as ET

# Sections that hold references and link lists, not prose.
BOILERPLATE_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes",
    "bibliography", "sources", "citations", "footnotes", "notes and references",
    "references and notes", "works cited", "gallery", "other uses",
}

# Namespaces whose links are not rendered as text in the article body.
HIDDEN_LINK_NAMESPACES = {"file", "image", "category", "media"}

# Tags whose content is not prose (formulas, references, galleries, code).
DROPPED_ELEMENTS = ("ref", "math", "gallery", "timeline", "imagemap", "score",
                    "syntaxhighlight", "source", "graph", "chem", "ce", "hiero",
                    "templatedata", "mapframe", "maplink")

DISAMBIGUATION_TEMPLATE = re.compile(
    r"\{\{\s*(disambiguation|disambig|dab|disamb|hndis|geodis|set index|"
    r"surname|given name|shipindex|mountainindex|roadindex)\s*[|}]",
    re.IGNORECASE)

COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
SELF_CLOSING_DROPPED = re.compile(
    r"<(?:%s)\b[^>]*/\s*>" % "|".join(DROPPED_ELEMENTS), re.IGNORECASE)
PAIRED_DROPPED = re.compile(
    r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(DROPPED_ELEMENTS),
    re.IGNORECASE | re.DOTALL)
LINE_BREAK_TAG = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
ANY_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
EXTERNAL_LINK = re.compile(
    r"\[(?:(?:https?|ftps?|irc|news|gopher):)?//[^\s\]]*(?:\s+([^\]]*))?\]"
    r"|\[mailto:[^\s\]]*(?:\s+([^\]]*))?\]", re.IGNORECASE)
BOLD_ITALIC = re.compile(r"'{2,}")
MAGIC_WORD = re.compile(r"__[A-Z]+__")
HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
INTERLANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")
WHITESPACE = re.compile(r"\s+")
# Removed templates and refs leave "word ." or "( ; born 1950)" behind.
SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])")
EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
PAREN_LEADING_PUNCT = re.compile(r"\(\s*[,;:]\s*")


def strip_balanced(text, opener, closer):
    """Remove every balanced opener...closer span, nesting included.

    An unmatched closer is dropped; an unmatched opener is dropped alone, so a
    typo in the dump cannot swallow the rest of the article.
    """
    token = re.compile(re.escape(opener) + "|" + re.escape(closer))
    out = []
    depth = 0
    pos = 0
    open_at = []
    for m in token.finditer(text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[pos:m.start()])
            open_at.append(m.start())
            depth += 1
        elif depth > 0:
            depth -= 1
            open_at.pop()
            if depth == 0:
                pos = m.end()
        else:
            out.append(text[pos:m.start()])
            pos = m.end()
    if depth > 0:
        # Keep what followed the outermost unclosed opener.
        out.append(text[open_at[0] + len(opener):])
    else:
        out.append(text[pos:])
    return "".join(out)


def render_wikilink(inner):
    """Text that [[inner]] shows on the page ('' for files/categories)."""
    target, has_label, label = inner.partition("|")
    target = target.strip()
    visible_namespace = target.startswith(":")  # [[:Category:X]] is a plain link
    target = target.lstrip(":").strip()
    if ":" in target and not visible_namespace:
        prefix = target.split(":", 1)[0].strip()
        if prefix.lower() in HIDDEN_LINK_NAMESPACES:
            return ""
        if not has_label and INTERLANGUAGE_PREFIX.match(prefix):
            return ""
    if has_label:
        label = label.strip()
        if label:
            return label
        # Pipe trick: [[Alien (law)|]] shows "Alien".
        shown = target.split(":", 1)[-1]
        return re.sub(r"\s*\(.*\)\s*$", "", shown)
    return target


def replace_wikilinks(text):
    token = re.compile(r"\[\[|\]\]")
    levels = [[]]
    pos = 0
    for m in token.finditer(text):
        levels[-1].append(text[pos:m.start()])
        if m.group() == "[[":
            levels.append([])
        elif len(levels) > 1:
            inner = "".join(levels.pop())
            levels[-1].append(render_wikilink(inner))
        pos = m.end()
    levels[-1].append(text[pos:])
    while len(levels) > 1:  # unclosed [[: keep its text, drop the brackets
        inner = "".join(levels.pop())
        levels[-1].append(inner)
    return "".join(levels[0])


def clean_inline(line):
    line = EXTERNAL_LINK.sub(lambda m: m.group(1) or m.group(2) or "", line)
    line = BOLD_ITALIC.sub("", line)
    line = ANY_TAG.sub("", line)
    line = MAGIC_WORD.sub("", line)
    line = html.unescape(line)
    line = WHITESPACE.sub(" ", line).strip()
    line = EMPTY_PARENS.sub("", line)
    line = PAREN_LEADING_PUNCT.sub("(", line)
    line = SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return WHITESPACE.sub(" ", line).strip()


def wikitext_heading(level, title):
    marks = " ".join(["="] * level)
    return " %s %s %s " % (marks, title, marks)


def article_blocks(wikitext):
    """Headings (as (level, title)) and paragraphs (as str) of one article."""
    text = COMMENT.sub("", wikitext)
    text = SELF_CLOSING_DROPPED.sub("", text)
    text = PAIRED_DROPPED.sub("", text)
    text = LINE_BREAK_TAG.sub(" ", text)
    text = strip_balanced(text, "{{", "}}")
    text = strip_balanced(text, "{|", "|}")
    text = replace_wikilinks(text)

    blocks = []
    paragraph = []

    def flush():
        if paragraph:
            joined = clean_inline(" ".join(paragraph))
            if joined:
                blocks.append(joined)
            paragraph.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        heading = HEADING.match(line)
        if heading:
            flush()
            title = clean_inline(heading.group(2))
            if title:
                blocks.append((max(len(heading.group(1)), 2), title))
        elif not line or line[0] in "*#:;|!" or line.startswith("----"):
            # Blank lines end paragraphs; lists, indents and table debris are dropped.
            flush()
        else:
            paragraph.append(line)
    flush()
    return drop_empty_sections(drop_boilerplate_sections(blocks))


def drop_boilerplate_sections(blocks):
    kept = []
    skip_below = None  # level of the boilerplate heading being skipped
    for block in blocks:
        if isinstance(block, tuple):
            level, title = block
            if skip_below is not None and level > skip_below:
                continue
            skip_below = level if title.lower() in BOILERPLATE_SECTIONS else None
            if skip_below is not None:
                continue
        elif skip_below is not None:
            continue
        kept.append(block)
    return kept


def drop_empty_sections(blocks):
    """Drop headings with no prose before the next heading of the same or higher rank."""
    kept = []
    for i, block in enumerate(blocks):
        if isinstance(block, tuple):
            has_prose = False
            for later in blocks[i + 1:]:
                if not isinstance(later, tuple):
                    has_prose = True
                    break
                if later[0] <= block[0]:
                    break
            if not has_prose:
                continue
        kept.append(block)
    return kept


def is_disambiguation(title, wikitext):
    return "(disambiguation)" in title.lower() or bool(DISAMBIGUATION_TEMPLATE.search(wikitext))


def iter_pages(path):
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {}
            for child in elem.iter():
                name = child.tag.rsplit("}", 1)[-1]
                if name in ("title", "ns", "text") and name not in fields:
                    fields[name] = child.text or ""
                elif name == "redirect":
                    fields["redirect"] = True
            yield fields
            elem.clear()


def clean_dump(path, min_prose_words):
    articles = []
    skipped = {"not main namespace": 0, "redirect": 0, "disambiguation": 0, "no prose": 0}
    for page in iter_pages(path):
        title = page.get("title", "").strip()
        wikitext = page.get("text", "")
        if page.get("ns", "0").strip() != "0":
            skipped["not main namespace"] += 1
            continue
        if page.get("redirect") or wikitext.lstrip().lower().startswith("#redirect"):
            skipped["redirect"] += 1
            continue
        if is_disambiguation(title, wikitext):
            skipped["disambiguation"] += 1
            continue
        blocks = article_blocks(wikitext)
        prose_words = sum(len(b.split()) for b in blocks if isinstance(b, str))
        if prose_words < min_prose_words:
            skipped["no prose"] += 1
            continue
        lines = [wikitext_heading(1, title)]
        for block in blocks:
            lines.append(wikitext_heading(*block) if isinstance(block, tuple) else block)
        articles.append("\n\n".join(lines))
    return articles, skipped


def split_point(articles):
    """Index k such that articles[:k] holds the share of characters closest to half."""
    total = sum(len(a) for a in articles)
    best_k, best_gap, running = 1, None, 0
    for k in range(1, len(articles)):
        running += len(articles[k - 1])
        gap = abs(2 * running - total)
        if best_gap is None or gap < best_gap:
            best_k, best_gap = k, gap
    return best_k


def write_text(path, articles):
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        out.write("\n\n".join(articles) + "\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", help="MediaWiki XML dump, .xml or .xml.bz2")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--min-prose-words", type=int, default=50,
                        help="skip articles with fewer words of prose (stubs, list pages)")
    args = parser.parse_args()

    try:
        articles, skipped = clean_dump(args.dump, args.min_prose_words)
    except (OSError, EOFError, ET.ParseError) as err:
        sys.exit("clean_wikipedia: cannot read %s: %s" % (args.dump, err))
    if len(articles) < 2:
        sys.exit("clean_wikipedia: %s: only %d article(s) kept, need 2 to split"
                 % (args.dump, len(articles)))

    k = split_point(articles)
    os.makedirs(args.out_dir, exist_ok=True)
    write_text(os.path.join(args.out_dir, "wiki.full.txt"), articles)
    write_text(os.path.join(args.out_dir, "wiki.eval.txt"), articles[:k])
    write_text(os.path.join(args.out_dir, "wiki.calib.txt"), articles[k:])

    title_of = lambda a: a.split("\n", 1)[0].strip(" =")
    print("clean_wikipedia: kept %d articles; skipped %s" % (
        len(articles), ", ".join("%d %s" % (n, why) for why, n in skipped.items())),
        file=sys.stderr)
    print("clean_wikipedia: eval = %d articles (%s .. %s), calib = %d articles (%s .. %s)" % (
        k, title_of(articles[0]), title_of(articles[k - 1]),
        len(articles) - k, title_of(articles[k]), title_of(articles[-1])), file=sys.stderr)


if __name__ == "__main__":
    main()
