"""The repository's promises: CI and `make test` run README's test command; requirements are
pinned."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('## Tests', 1)[1]
  command = re.search(r'```bash\n(.+?)\n```', section, re.S).group(1).strip()
  ci_lines = [l.strip() for l in (ROOT / '.ci' / 'run').read_text().splitlines()
              if l.strip() and not l.lstrip().startswith('#')]
  assert ci_lines[-1] == command
  make_test = (ROOT / 'Makefile').read_text().split('\ntest:', 1)[1].splitlines()[1].strip()
  assert make_test.endswith(command), make_test


def test_requirements_are_pinned():
  lines = [l.strip() for l in (ROOT / 'requirements.txt').read_text().splitlines()
           if l.strip() and not l.startswith('#')]
  assert all('==' in line for line in lines), lines
  assert 'torch==2.13.0' in lines
