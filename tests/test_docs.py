"""The docs' examples run as written: every ```python and ```bash block of README.md and docs/*.md runs on the tiny
model, or the line before it says why not (`<!-- not-run: reason -->`). Blocks in another language or none (layouts,
array shapes, pseudo-code) are text. The examples' paths exist: `~` is a temporary home holding the tiny export as
~/GritLM-7B, and the working directory has the repository's configs/ and data/ and the tiny export as runs/tiny/hf."""
import glob
import os
import re
import shlex
import shutil

import pytest

from grit_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
RUN = ("python", "bash")
NOT_RUN = re.compile(r"<!-- not-run: (\S.*?) -->")
# Commands that fetch what a test cannot: the tiny export already stands where they put theirs.
STAND_INS = {"huggingface-cli download GritLM/GritLM-7B --local-dir ~/GritLM-7B"}


def code_blocks(doc: str) -> list[tuple[int, str, str, str | None]]:
  """(line, language, code, not-run reason or None) of each fenced block of `doc`."""
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    lines = f.read().split("\n")
  blocks, i = [], 0
  while i < len(lines):
    if lines[i].startswith("```"):
      end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
      reason = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
      blocks.append((i + 1, lines[i][3:].strip(), "\n".join(lines[i + 1:end]), reason and reason.group(1)))
      i = end
    i += 1
  return blocks


def bash_commands(code: str) -> list[str]:
  """The block's commands: continuation lines joined, comments and blank lines dropped."""
  joined = re.sub(r"\\\n", " ", code)
  return [" ".join(shlex.split(line, comments=True)) for line in joined.split("\n") if shlex.split(line, comments=True)]


def run_bash(code: str, where: str) -> None:
  for command in bash_commands(code):
    if command in STAND_INS:
      continue
    argv = [os.path.expanduser(a) for a in shlex.split(command)]  # the shell expands an unquoted ~/
    assert argv[0] == "grit-jax", f"{where}: `{command}` cannot run here: mark the block <!-- not-run: reason -->"
    assert cli.main(argv[1:]) == 0, f"{where}: `{command}` failed"


@pytest.fixture
def doc_world(tiny_hf_dir, tmp_path, monkeypatch):
  home, work = tmp_path / "home", tmp_path / "work"
  shutil.copytree(tiny_hf_dir, home / "GritLM-7B")
  shutil.copytree(tiny_hf_dir, work / "runs" / "tiny" / "hf")
  for name in ("configs", "data"):
    os.symlink(os.path.join(ROOT, name), work / name)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(work)


@pytest.mark.parametrize("doc", DOCS)
def test_doc_examples_run_as_written(doc, doc_world, capsys):
  ran, not_run = [], []
  namespace = {"__name__": "__doc_example__"}  # one per document: its blocks build on each other, as a reader's do
  for line, lang, code, reason in code_blocks(doc):
    if lang not in RUN:
      continue
    where = f"{doc}:{line}"
    if reason:
      not_run.append(f"{where} ({reason})")
    elif lang == "python":
      exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the documentation's own example
      ran.append(where)
    else:
      run_bash(code, where)
      ran.append(where)
  with capsys.disabled():  # name what was not run, and why, in the test's output
    print(f"\n{doc}: ran {len(ran)} blocks ({', '.join(ran) or '-'}); not run: {'; '.join(not_run) or '-'}")


def test_doc_links_stay_inside_the_repository():
  """Relative links and `../` paths of the docs name files of this checkout (DESIGN.md once pointed outside it)."""
  for doc in DOCS:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      text = f.read()
    base = os.path.dirname(os.path.join(ROOT, doc))
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
    targets += re.findall(r"(?<![\w/.])(\.\./[\w./-]+)", text)
    for t in targets:
      path = os.path.normpath(os.path.join(base, t))
      assert path.startswith(ROOT + os.sep) and os.path.exists(path), f"{doc}: {t} is not a file of this repository"


def test_a_block_neither_run_nor_marked_fails(tmp_path):
  """The checker itself: an unmarked shell command that is not grit-jax is an error naming the line."""
  with pytest.raises(AssertionError, match=r"X.md:3: `make demo` cannot run here"):
    run_bash("make demo   # a comment\n", "X.md:3")
  assert bash_commands("grit-jax eval \\\n  --model m  # c\n\n") == ["grit-jax eval --model m"]
  python = [b for b in code_blocks("README.md") if b[1] == "python"]
  ran = [b for b in python if not b[3]]  # README's Python examples run, except the ones that need a server / an index
  assert len(ran) >= 3 and "GritLM.from_pretrained" in ran[0][2]
  assert all("openai" in b[2] or "search(" in b[2] for b in python if b[3]), [b[2][:60] for b in python if b[3]]
