"""reasoning-gym tasks as training records, with step-by-step solutions rendered from each item's metadata and
checked against the generator's own answer (only gsm_symbolic ships solution text, and it is GSM8K-test-derived)."""
from __future__ import annotations

import ast
from decimal import Decimal
from typing import Callable

from .errors import UserError

TEST_DERIVED_TASKS = {"gsm_symbolic": "its problems are templates of GSM8K test questions"}


def reasoning_gym_items(tasks: list[str], size: int, seed: int, *, allow_test_derived: bool = False
                        ) -> list[tuple[str, int, list]]:
    """(source, item number, messages) for `size` generated problems per task; the assistant target is a computed
    step-by-step solution ending in "#### ANSWER" for the tasks in STEP_BY_STEP_TASKS, else the generator's final
    answer."""
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("data.reasoning_gym_tasks needs the reasoning-gym package: pip install reasoning-gym") from None
    out = []
    for task in tasks:
        _refuse_test_derived(task, allow_test_derived)
        try:
            items = reasoning_gym.create_dataset(task, size=size, seed=seed)
        except Exception as e:  # unknown task names raise a bare error from the registry
            raise UserError(f"data.reasoning_gym_tasks: cannot create task {task!r} ({e}); see "
                            "reasoning_gym.factory.DATASETS for the names") from None
        for n, item in enumerate(items, 1):
            messages = [{"role": "user", "content": item["question"]},
                        {"role": "assistant", "content": solution_text(task, item)}]
            out.append((f"reasoning-gym:{task}", n, messages))
    return out


def reasoning_gym_score(source: str, item_number: int, answer: str, size: int, seed: int) -> float:
    """reasoning-gym's own scorer for the item a record came from (its dataset is regenerated from size and seed)."""
    import reasoning_gym

    task = source.split(":", 1)[1]
    dataset = _datasets.get((task, size, seed))
    if dataset is None:
        dataset = _datasets[(task, size, seed)] = reasoning_gym.create_dataset(task, size=size, seed=seed)
    return float(dataset.score_answer(answer, dataset[item_number - 1]))


_datasets: dict = {}


def _refuse_test_derived(task: str, allowed: bool) -> None:
    if task in TEST_DERIVED_TASKS and not allowed:
        raise UserError(f"data.reasoning_gym_tasks: {task!r} must not be trained on when GSM8K test is the "
                        f"evaluation: {TEST_DERIVED_TASKS[task]}; remove it (or set data.allow_test_derived: true "
                        "if GSM8K test is not your evaluation)")


def solution_text(task: str, item: dict) -> str:
    """Target text of a reasoning-gym item: checked steps + "#### ANSWER", or the bare answer."""
    answer = str(item["answer"])
    steps = _STEPS.get(task)
    try:
        lines = steps(item["metadata"], answer) if steps else None
    except (ValueError, KeyError, ArithmeticError, SyntaxError, TypeError):
        lines = None  # the rendered steps would not reach the generator's answer: give the answer only
    return "\n".join(lines) + f"\n#### {answer}" if lines else answer


def _expect(got: object, answer: str) -> None:
    if str(got) != answer:
        raise ValueError(f"steps give {got}, generator says {answer}")


def _num(x) -> str:
    return f"({x})" if x < 0 else str(x)


def _arith_steps(md: dict, answer: str) -> list[str]:
    expr, lines = md["expression"], []

    def ev(node):
        if isinstance(node, ast.Constant):  # the literal's own text keeps decimal places ("5.720")
            text = ast.get_source_segment(expr, node)
            return Decimal(text) if "." in text else int(text)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = -ev(node.operand)
            if not isinstance(node.operand, ast.Constant):
                lines.append(f"-{_num(-value)} = {value}")
            return value
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Div):
            if b == 0 or a % b:
                raise ValueError("inexact division")  # the task floors; "=" would be false
            value, sym = a // b, "/"
        elif isinstance(node.op, ast.Mult):
            value, sym = a * b, "*"
            lines.extend(_long_multiplication(a, b))
        else:
            value, sym = {ast.Add: (a + b, "+"), ast.Sub: (a - b, "-")}[type(node.op)]
        lines.append(f"{a} {sym} {_num(b)} = {value}")
        return value

    _expect(ev(ast.parse(expr, mode="eval").body), answer)
    return lines


def _long_multiplication(a, b) -> list[str]:
    # Partial products by the digits of |b|, for integer products with a multi-digit factor.
    if not (isinstance(a, int) and isinstance(b, int)) or abs(a) < 10 or abs(b) < 10:
        return []
    parts = [(abs(a), int(d) * 10**k) for k, d in enumerate(reversed(str(abs(b)))) if d != "0"][::-1]
    lines = [f"{x} * {y} = {x * y}" for x, y in parts]
    return lines + [" + ".join(str(x * y) for x, y in parts) + f" = {abs(a * b)}"] if len(parts) > 1 else lines


def _leg_steps(md: dict, answer: str) -> list[str]:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    terms = [(n, name, ANIMALS[name]) for name, n in md["animals"].items()]
    lines = [f"{n} {name} x {legs} legs = {n * legs}" for n, name, legs in terms]
    total = sum(n * legs for n, _, legs in terms)
    _expect(total, answer)
    return lines + [" + ".join(str(n * legs) for n, _, legs in terms) + f" = {total}"]


def _euclid(a: int, b: int, lines: list[str]) -> int:
    x, y = max(a, b), min(a, b)
    while y:
        lines.append(f"{x} = {x // y} x {y} + {x % y}")
        x, y = y, x % y
    lines.append(f"gcd({a}, {b}) = {x}")
    return x


def _gcd_steps(md: dict, answer: str) -> list[str]:
    lines, g = [], md["numbers"][0]
    for n in md["numbers"][1:]:
        g = _euclid(g, n, lines)
    _expect(g, answer)
    return lines


def _lcm_steps(md: dict, answer: str) -> list[str]:
    lines, m = [], md["numbers"][0]
    for n in md["numbers"][1:]:
        g = _euclid(m, n, lines)
        lines.append(f"lcm({m}, {n}) = {m} x {n} / {g} = {m * n // g}")
        m = m * n // g
    _expect(m, answer)
    return lines


def _factor_steps(md: dict, answer: str) -> list[str]:
    n, d, lines, factors = md["number"], 2, [], []
    while d * d <= n:
        while n % d == 0:
            lines.append(f"{n} / {d} = {n // d}")
            n, factors = n // d, factors + [d]
        d += 1
    if n > 1:
        lines.append(f"{n} is prime")
        factors.append(n)
    _expect(" × ".join(map(str, factors)), answer)
    return lines


def _fraction_steps(md: dict, answer: str) -> list[str]:
    a, b, lines = md["numerator"], md["denominator"], []
    g = _euclid(a, b, lines)
    if (a // g, b // g) != (md["simplified_numerator"], md["simplified_denominator"]):
        raise ValueError("different reduction")
    return lines + [f"{a} / {g} = {a // g}", f"{b} / {g} = {b // g}"]


def _base_steps(md: dict, answer: str) -> list[str]:
    digits, src, dst, value = md["source_repr"], md["source_base"], md["target_base"], md["decimal_value"]
    lines = []
    if src != 10:
        terms = [f"{int(c, 36)}*{src}^{k}" for k, c in zip(range(len(digits) - 1, -1, -1), digits, strict=True)]
        lines.append(f"{digits} in base {src} = " + " + ".join(terms) + f" = {value}")
    if dst == 10:
        _expect(value, answer)
        return lines
    out, n = "", value
    while n:
        q, r = divmod(n, dst)
        char = "0123456789abcdefghijklmnopqrstuvwxyz"[r]
        lines.append(f"{n} / {dst} = {q} remainder {r}" + (f" ({char})" if r > 9 else ""))
        out, n = char + out, q
    _expect(out or "0", answer)
    return lines + [f"reading the remainders from last to first: {out or '0'}"]


def _geometry_steps(md: dict, answer: str) -> list[str]:
    n, angles = md["n_sides"], [Decimal(str(a)) for a in md["known_angles"]]
    total, known = (n - 2) * 180, sum(angles)
    missing = total - known
    _expect(round(missing), answer)
    return [f"the interior angles of a {n}-sided polygon sum to ({n} - 2) x 180 = {total}",
            "the known angles sum to " + " + ".join(map(str, angles)) + f" = {known}",
            f"the last angle is {total} - {known} = {missing}"]


def _bits_steps(md: dict, answer: str) -> list[str]:
    binary = bin(md["number"])[2:]
    _expect(binary.count("1"), answer)
    return [f"{md['number']} in binary is {binary}", f"it has {binary.count('1')} ones"]


_STEPS: dict[str, Callable[[dict, str], list[str]]] = {
    "chain_sum": _arith_steps, "decimal_chain_sum": _arith_steps, "products": _arith_steps,
    "basic_arithmetic": _arith_steps, "leg_counting": _leg_steps, "gcd": _gcd_steps, "lcm": _lcm_steps,
    "prime_factorization": _factor_steps, "fraction_simplification": _fraction_steps,
    "base_conversion": _base_steps, "simple_geometry": _geometry_steps, "count_bits": _bits_steps,
}
STEP_BY_STEP_TASKS = tuple(_STEPS)  # reasoning-gym tasks whose targets are rendered, checked solutions
