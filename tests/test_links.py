"""The links of README.md and docs/*.md land where they say.

- A link to a line of a repository .py file, `file.py#L<n>` or `file.py#L<n>-L<m>`, names what it points at
  ([`train.DATASETS`](train.py#L<n>), [`SphereEncoder.forward`](model.py#L<n>)), and line n defines it:
  `def name`, `class name` or `name =` at the start of the stripped line (for `Class.method`, inside that
  class); a name the file never defines (a plain mention) must appear on line n. So a link that drifts by a
  line, as code is edited above it, fails here, and test_a_line_link_moved_by_one_line_fails shows it would.
- Every relative link, image and <img src> points into the repository at a file that exists, and an
  anchor into a .md file at one of its headings.
When code moves, `python tests/test_links.py --fix` rewrites each line link to where its name is defined now.
"""
import functools
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
LINK = re.compile(r"\[([^\]\n]*)\]\(([^)\s]+)\)")                  # [text](target), one line
IMG = re.compile(r"<img\s[^>]*\bsrc=\"([^\"]+)\"")
LINES = re.compile(r"^L(\d+)(?:-L(\d+))?$")                        # a line fragment: #L12, #L12-L20


@functools.lru_cache(maxsize=None)
def read(path):
    """A repository file's lines (a tuple: read once per run)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return tuple(f.read().splitlines())


def links(page):
    """[(line number in page, link text, target)] outside fenced code blocks; <img src> with text None."""
    out, fenced = [], False
    for i, line in enumerate(read(page), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced:
            out += [(i, m[1], m[2]) for m in LINK.finditer(line)] + [(i, None, m[1]) for m in IMG.finditer(line)]
    return out


def line_links_of(page, target):
    """(repository path of the .py file, n, m or None) of a #L link target in page, else None."""
    path, _, frag = target.partition("#")
    if not (path.endswith(".py") and (m := LINES.match(frag))):
        return None
    rel = os.path.relpath(os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)), ROOT)
    return rel, int(m[1]), int(m[2]) if m[2] else None


def line_links(page):
    """[(line in page, text, repository path of the .py file, n, m or None)] of the page's #L links."""
    return [(i, text, *found) for i, text, target in links(page) if (found := line_links_of(page, target))]


def named(text):
    """The identifier a link text names (`train.DATASETS` -> ['train', 'DATASETS']), else None."""
    name = (text or "").strip().strip("`").removesuffix("()")
    if LINES.match(name) or name.endswith((".py", ".md")):                # [L12](x.py#L12), [x.py](x.py#L12)
        return None
    return name.split(".") if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name) else None


def defines(line, name):
    s = line.strip()
    return bool(re.match(rf"(async\s+def|def|class)\s+{name}\b", s)                    # def, class
                or re.match(rf"{name}\s*(:[^=]*)?=(?!=)", s) or re.match(rf"{name}\s*:\s*\w", s))   # NAME =, name: T


def enclosing_class(lines, n):
    """The class whose body holds line n (1-based), by indentation, or None."""
    indent = len(lines[n - 1]) - len(lines[n - 1].lstrip())
    for line in reversed(lines[:n - 1]):
        stripped = line.lstrip()
        if stripped and not stripped.startswith("#") and len(line) - len(stripped) < indent:
            m = re.match(r"class\s+(\w+)", stripped)
            if m:
                return m[1]
            indent = len(line) - len(stripped)
    return None


def check_line(path, n, m, text):
    """Why the link [text](path#Ln[-Lm]) is wrong, or None."""
    lines, module = read(path), os.path.splitext(os.path.basename(path))[0]
    if not 1 <= n <= len(lines) or (m is not None and not n <= m <= len(lines)):
        return f"{path} has {len(lines)} lines, the link points at L{n}" + (f"-L{m}" if m else "")
    parts = named(text)
    if parts is None:
        return f"the link text {text!r} names no identifier: name what L{n} holds, e.g. [`name`]({path}#L{n})"
    parts = parts[1:] if parts[0] == module and len(parts) > 1 else parts
    name, owner = parts[-1], parts[-2] if len(parts) > 1 else None
    in_class = owner and owner != module and re.search(rf"^\s*class\s+{owner}\b", "\n".join(lines), re.M)
    where = [k for k, line in enumerate(lines, 1)
             if defines(line, name) and (not in_class or enclosing_class(lines, k) == owner)]
    if where:                                                               # a definition: line n must be it
        if n not in where:
            what = f"{owner}.{name}" if in_class else name
            return f"{path}#L{n} does not define {what} (defined at L{', L'.join(map(str, where))})"
    elif not re.search(rf"\b{re.escape(name)}\b", lines[n - 1]):          # a plain mention: on that line
        return f"{path}#L{n} does not mention {name}"
    return None


def headings(path):
    """GitHub's anchors of a markdown file's headings."""
    out, fenced, seen = set(), False, {}
    for line in read(path):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and (h := re.match(r"#{1,6}\s+(.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", h[1].strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES)
def test_line_links_land_on_what_they_name(page):
    bad = [f"{page}:{i}: [{text}]: {why}" for i, text, path, n, m in line_links(page)
           if (why := check_line(path, n, m, text))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_at_files_that_exist(page):
    bad = []
    for i, text, target in links(page):
        if re.match(r"[a-z]+:", target):                                   # https:, mailto:
            continue
        path, _, frag = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if os.path.commonpath([full, ROOT]) != ROOT:
            bad.append(f"{page}:{i}: {target} points outside the repository")
        elif not os.path.exists(full):
            bad.append(f"{page}:{i}: {target}: no such file")
        elif full.endswith(".md") and frag and frag not in headings(os.path.relpath(full, ROOT)):
            bad.append(f"{page}:{i}: {target}: no heading #{frag} there")
    assert not bad, "\n".join(bad)


def test_a_line_link_moved_by_one_line_fails():
    """Each line link, moved one line up or down, is caught (the check above is not vacuous)."""
    found = [(page, *link) for page in PAGES for link in line_links(page)]
    assert found, "no line links found: the pattern is broken"
    slack = [f"{page}:{i}: [{text}]({path}#L{n}) passes at L{n + d}" for page, i, text, path, n, m in found
             for d in (-1, 1) if check_line(path, n, m, text) is None           # wrong links: reported above
             and check_line(path, n + d, m and m + d, text) is None]
    assert not slack, "\n".join(slack)


def fix():
    """Rewrite each wrong line link whose name is defined once in its file to that definition's line."""
    for page in PAGES:
        src, changed = list(read(page)), False
        for i, text, target in links(page):
            found = line_links_of(page, target)
            if not found or not check_line(*found, text):
                continue
            path, n, m = found
            where = [k for k in range(1, len(read(path)) + 1) if check_line(path, k, None, text) is None]
            if len(where) == 1:
                new = target.replace(f"#L{n}", f"#L{where[0]}")
                new = new.replace(f"-L{m}", f"-L{m + where[0] - n}") if m else new
                src[i - 1] = src[i - 1].replace(f"]({target})", f"]({new})")
                print(f"{page}:{i}: {target} -> {new}")
                changed = True
        if changed:
            with open(os.path.join(ROOT, page), "w", encoding="utf-8") as f:
                f.write("\n".join(src) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--fix"]:
    fix()
