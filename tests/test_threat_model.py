"""Threat-model traceability: every threat in threat_model/threats.toml is proved by a marked test, and back.

The test files are parsed with ``ast`` rather than collected, so the check sees every test whatever
pytest selection runs it, and it reports every problem at once.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECURITY_WORDS = ("refuse", "reject", "spoof", "forged", "bypass", "smuggl", "hijack", "replay", "adversarial")
ADVERSARIAL_DIR = "adversarial"
THREAT_KEYS = frozenset({"id", "title", "threat", "mitigation", "tests"})
TEXT_KEYS = ("title", "threat", "mitigation")
ID_SHAPE = re.compile(r"T(-[A-Z0-9]+)+")


@dataclass(frozen=True, slots=True)
class FoundTest:
    """One test function as pytest would name it, with every threat its markers declare."""

    node_id: str
    threats: frozenset[str]
    security: bool


def check(tests_root: Path, toml_path: Path) -> list[str]:
    """Every traceability problem between the tests under ``tests_root`` and the threats in ``toml_path``."""
    problems: list[str] = []
    threats = load_threats(toml_path, problems)
    tests = scan_tests(tests_root, threats, problems)
    marked = {threat for test in tests.values() for threat in test.threats}
    for threat_id, listed in threats.items():
        if threat_id not in marked:
            problems.append(f"{threat_id}: no test is marked with it")
        for node_id in listed:
            test = tests.get(node_id.split("[", 1)[0])
            if test is None:
                problems.append(f"{threat_id}: lists {node_id}, which is not a test")
            elif threat_id not in test.threats:
                problems.append(f"{threat_id}: lists {node_id}, which is not marked with it")
    for test in tests.values():
        if test.security and not test.threats:
            problems.append(f"{test.node_id}: security test names no threat (add @pytest.mark.threat)")
    return problems


def load_threats(toml_path: Path, problems: list[str]) -> dict[str, list[str]]:
    """The threat ids in ``toml_path``, each with the tests it lists; what is wrong goes to ``problems``."""
    try:
        document = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{toml_path.name}: cannot be read: {exc}")
        return {}
    for extra in sorted(set(document) - {"threat"}):
        problems.append(f"{toml_path.name}: unexpected top-level key {extra!r}")
    entries = document.get("threat", [])
    if not isinstance(entries, list):
        problems.append(f"{toml_path.name}: `threat` must be an array of tables ([[threat]])")
        return {}
    threats: dict[str, list[str]] = {}
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            problems.append(f"{toml_path.name}: threat #{number} is not a table")
            continue
        threat_id = entry.get("id")
        if not isinstance(threat_id, str) or not ID_SHAPE.fullmatch(threat_id):
            problems.append(f"threat #{number}: id {threat_id!r} is not shaped like T-AREA-NAME")
            continue
        if threat_id in threats:
            problems.append(f"{threat_id}: duplicated id")
        for extra in sorted(set(entry) - THREAT_KEYS):
            problems.append(f"{threat_id}: unexpected key {extra!r}")
        for key in TEXT_KEYS:
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{threat_id}: lacks {key}")
        listed = entry.get("tests", [])
        if not isinstance(listed, list) or not all(isinstance(node_id, str) for node_id in listed):
            problems.append(f"{threat_id}: tests must be a list of test node ids")
            listed = []
        threats.setdefault(threat_id, listed)
    return threats


def scan_tests(tests_root: Path, known: dict[str, list[str]], problems: list[str]) -> dict[str, FoundTest]:
    """Every test function under ``tests_root`` by node id; bad or stray markers go to ``problems``."""
    tests: dict[str, FoundTest] = {}
    for path in sorted(tests_root.rglob("*.py")):
        relative = path.relative_to(tests_root.parent).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        except (OSError, UnicodeDecodeError, SyntaxError) as exc:
            problems.append(f"{relative}: cannot be parsed: {exc}")
            continue
        scanner = _FileScanner(relative, problems)
        if _collected(path):
            parts = path.relative_to(tests_root).parts
            adversarial = len(parts) > 1 and parts[0] == ADVERSARIAL_DIR
            for test in scanner.tests(tree, adversarial):
                tests[test.node_id] = test
        scanner.report_stray_markers(tree, known)
    return tests


def _collected(path: Path) -> bool:
    return path.name.startswith("test_") or path.name.endswith("_test.py")


def _is_threat_mark(node: ast.expr) -> bool:
    """``pytest.mark.threat`` or ``mark.threat``, the only spellings the check follows."""
    if not isinstance(node, ast.Attribute) or node.attr != "threat":
        return False
    owner = node.value
    return (isinstance(owner, ast.Attribute) and owner.attr == "mark") or (
        isinstance(owner, ast.Name) and owner.id == "mark"
    )


class _FileScanner:
    """Reads the threat markers of one test file and the tests they attach to."""

    def __init__(self, relative: str, problems: list[str]) -> None:
        self.relative = relative
        self.problems = problems
        self.attached: set[int] = set()

    def tests(self, tree: ast.Module, adversarial: bool) -> Iterator[FoundTest]:
        module_threats = self._threats(_pytestmark_values(tree.body))
        yield from self._walk(tree.body, self.relative, module_threats, adversarial)

    def report_stray_markers(self, tree: ast.Module, known: dict[str, list[str]]) -> None:
        """Flag markers nothing collects, bare or non-literal markers, and ids the threat model lacks."""
        calls = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_threat_mark(node) and id(node) not in calls:
                self._problem(node, "threat marker must be called with threat ids")
            if not isinstance(node, ast.Call) or not _is_threat_mark(node.func):
                continue
            if id(node) not in self.attached:
                self._problem(node, "threat marker is not on a collected test, test class or pytestmark")
            if not node.args or node.keywords:
                self._problem(node, "threat marker must name threat ids as positional strings")
            for argument in node.args:
                if not (isinstance(argument, ast.Constant) and isinstance(argument.value, str)):
                    self._problem(node, "threat marker arguments must be string literals")
                elif argument.value not in known:
                    self._problem(node, f"marker names unknown threat {argument.value!r}")

    def _walk(
        self, body: list[ast.stmt], prefix: str, inherited: frozenset[str], adversarial: bool
    ) -> Iterator[FoundTest]:
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                own = self._threats([*node.decorator_list, *_pytestmark_values(node.body)])
                yield from self._walk(node.body, f"{prefix}::{node.name}", inherited | own, adversarial)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                name = node.name.lower()
                yield FoundTest(
                    node_id=f"{prefix}::{node.name}",
                    threats=inherited | self._threats(node.decorator_list),
                    security=adversarial or any(word in name for word in SECURITY_WORDS),
                )

    def _threats(self, expressions: list[ast.expr]) -> frozenset[str]:
        """Threat ids declared anywhere in ``expressions`` (decorators, pytestmark values, param marks)."""
        found: set[str] = set()
        for expression in expressions:
            for node in ast.walk(expression):
                if isinstance(node, ast.Call) and _is_threat_mark(node.func):
                    self.attached.add(id(node))
                    found.update(
                        argument.value
                        for argument in node.args
                        if isinstance(argument, ast.Constant) and isinstance(argument.value, str)
                    )
        return frozenset(found)

    def _problem(self, node: ast.expr, message: str) -> None:
        self.problems.append(f"{self.relative}:{node.lineno}: {message}")


def _pytestmark_values(body: list[ast.stmt]) -> list[ast.expr]:
    values: list[ast.expr] = []
    for node in body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(target, ast.Name) and target.id == "pytestmark" for target in targets):
            values.append(value)
    return values


def test_threat_model_is_traceable() -> None:
    """Every threat has a marked test, every marker names a known threat, every security test names one."""
    problems = check(REPO / "tests", REPO / "threat_model" / "threats.toml")
    assert not problems, "threat model traceability:\n  " + "\n  ".join(problems)


GOOD_TOML = """
[[threat]]
id = "T-A"
title = "a"
threat = "attacker does a"
mitigation = "mcpguard/a.py stops a"
tests = ["tests/test_a.py::test_a_refused[case]", "tests/test_a.py::TestB::TestInner::test_inner"]

[[threat]]
id = "T-B"
title = "b"
threat = "attacker does b"
mitigation = "mcpguard/b.py stops b"

[[threat]]
id = "T-C"
title = "c"
threat = "attacker does c"
mitigation = "mcpguard/c.py stops c"
"""

GOOD_TEST = """
import pytest

@pytest.mark.threat("T-A")
@pytest.mark.parametrize("case", [1])
def test_a_refused(case):
    pass

@pytest.mark.threat("T-B")
class TestB:
    def test_replayed_b(self):
        pass

    class TestInner:
        pytestmark = [pytest.mark.threat("T-A")]

        async def test_inner(self):
            pass

def test_plain_behaviour():
    pass
"""

GOOD_ADVERSARIAL = """
import pytest

pytestmark = pytest.mark.threat("T-C")

def test_anything():
    pass
"""


def write_tree(root: Path, files: dict[str, str], toml: str) -> tuple[Path, Path]:
    for name, text in files.items():
        path = root / "tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    toml_path = root / "threats.toml"
    toml_path.write_text(toml, encoding="utf-8")
    return root / "tests", toml_path


def test_checker_passes_consistent_tree(tmp_path: Path) -> None:
    """Function, class, nested-class and module markers all count, and listed node ids resolve."""
    files = {"test_a.py": GOOD_TEST, "adversarial/test_c.py": GOOD_ADVERSARIAL, "conftest.py": "X = 1\n"}
    assert check(*write_tree(tmp_path, files, GOOD_TOML)) == []


def test_checker_flags_toml_problems(tmp_path: Path) -> None:
    """Duplicate ids, missing texts, bad ids, unknown keys and lists naming unmarked tests are all reported."""
    toml = (
        GOOD_TOML
        + """
[[threat]]
id = "T-B"
title = ""
threat = "again"
mitigation = "x"
mitigations = "typo"

[[threat]]
id = "T-E"
title = "e"
threat = "attacker does e"
mitigation = "mcpguard/e.py stops e"
tests = ["tests/test_a.py::test_plain_behaviour"]

[[threat]]
id = "not-an-id"

[[threat]]
id = "T-D"
"""
    )
    problems = check(*write_tree(tmp_path, {"test_a.py": GOOD_TEST, "adversarial/test_c.py": GOOD_ADVERSARIAL}, toml))
    assert sorted(problems) == sorted(
        [
            "T-B: duplicated id",
            "T-B: unexpected key 'mitigations'",
            "T-B: lacks title",
            "T-E: no test is marked with it",
            "T-E: lists tests/test_a.py::test_plain_behaviour, which is not marked with it",
            "threat #6: id 'not-an-id' is not shaped like T-AREA-NAME",
            "T-D: lacks title",
            "T-D: lacks threat",
            "T-D: lacks mitigation",
            "T-D: no test is marked with it",
        ]
    )


def test_checker_flags_marker_problems(tmp_path: Path) -> None:
    """Unknown ids, empty, non-literal, bare and detached markers, untested threats and dangling lists are reported."""
    source = """
import pytest

IDS = "T-A"
forge = pytest.mark.threat("T-A")

@pytest.mark.threat("T-NOPE", IDS)
def test_one():
    pass

@pytest.mark.threat
def test_two():
    pass

@forge
def test_three():
    pass

@pytest.mark.threat()
def test_four():
    pass
"""
    problems = check(*write_tree(tmp_path, {"test_a.py": source}, GOOD_TOML))
    assert sorted(problems) == sorted(
        [
            "tests/test_a.py:5: threat marker is not on a collected test, test class or pytestmark",
            "tests/test_a.py:7: threat marker arguments must be string literals",
            "tests/test_a.py:7: marker names unknown threat 'T-NOPE'",
            "tests/test_a.py:11: threat marker must be called with threat ids",
            "tests/test_a.py:19: threat marker must name threat ids as positional strings",
            "T-A: no test is marked with it",
            "T-A: lists tests/test_a.py::test_a_refused[case], which is not a test",
            "T-A: lists tests/test_a.py::TestB::TestInner::test_inner, which is not a test",
            "T-B: no test is marked with it",
            "T-C: no test is marked with it",
        ]
    )


def test_checker_flags_unmarked_security_tests(tmp_path: Path) -> None:
    """A test named like a security test, or under tests/adversarial/, must carry a threat marker somewhere."""
    files = {
        "test_a.py": GOOD_TEST,
        "adversarial/test_c.py": GOOD_ADVERSARIAL,
        "adversarial/test_more.py": "def test_quiet():\n    pass\n",
        "test_words.py": "\n".join(
            f"def test_{word}_case():\n    pass\n" for word in ("token_refused", "session_hijacked", "Forged_key")
        )
        + "\nclass TestSmuggling:\n"
        + "    def test_body(self):\n        pass\n"
        + "    def test_smuggled(self):\n        pass\n",
        "helpers.py": 'import pytest\nthreat = pytest.mark.threat("T-A")\n',
    }
    problems = check(*write_tree(tmp_path, files, GOOD_TOML))
    assert sorted(problems) == sorted(
        [
            "tests/adversarial/test_more.py::test_quiet: security test names no threat (add @pytest.mark.threat)",
            "tests/test_words.py::test_token_refused_case: security test names no threat (add @pytest.mark.threat)",
            "tests/test_words.py::test_session_hijacked_case: security test names no threat (add @pytest.mark.threat)",
            "tests/test_words.py::test_Forged_key_case: security test names no threat (add @pytest.mark.threat)",
            "tests/test_words.py::TestSmuggling::test_smuggled: security test names no threat "
            "(add @pytest.mark.threat)",
            "tests/helpers.py:2: threat marker is not on a collected test, test class or pytestmark",
        ]
    )


def test_checker_reports_unreadable_inputs(tmp_path: Path) -> None:
    """A TOML syntax error and a test file that does not parse are reported, not raised."""
    problems = check(*write_tree(tmp_path, {"test_bad.py": "def test_(:\n"}, "[[threat]\n"))
    assert len(problems) == 2
    assert problems[0].startswith("threats.toml: cannot be read:")
    assert problems[1].startswith("tests/test_bad.py: cannot be parsed:")
