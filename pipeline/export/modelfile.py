"""An Ollama Modelfile whose TEMPLATE renders exactly what the tokenizer's chat template renders.

The chat template (Jinja) is probed with sentinel messages to find, per role,
the text before and after a message's content, the default system block some
templates insert, and the generation prompt. From those parts we write a Go
`text/template` (Ollama's template language) and then prove it: render both
for several conversations and compare byte for byte. Rendering uses Go itself
when `go` is installed (Ollama's own engine); otherwise a small interpreter of
exactly the constructs our TEMPLATE uses, which the test suite checks against
Go on every template it generates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import ROLES
from pipeline.data.template import render_chat
from pipeline.errors import UserError

_SENTINEL = {"system": "QqSYSqQ", "user": "QqUSRqQ", "assistant": "QqASTqQ", "user2": "QqUS2qQ"}

CONVERSATIONS = (  # what the proof renders: with and without a system turn, one and two turns
    [{"role": "user", "content": "What is LoRA?"}],
    [
        {"role": "user", "content": "What is LoRA?"},
        {"role": "assistant", "content": "A small adapter."},
        {"role": "user", "content": "And QLoRA?"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Define DPO."},
    ],
)


@dataclass(frozen=True)
class Parts:
    default_system: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    # templates with no system block of their own (Mistral, Gemma) write the system message into the first user
    # turn, followed by this separator; None where the system message is a turn of its own
    system_fold: str | None = None


# The chat template's text as the model sees it, without a BOS the template writes where the tokenizer adds one
# (llama.cpp and Ollama add it from the GGUF, so a TEMPLATE that wrote it too would double it).
render = render_chat


def derive(tokenizer) -> Parts:
    """Find the per-role wrappers of the tokenizer's chat template (templates that concatenate blocks)."""
    s, u, a = _SENTINEL["system"], _SENTINEL["user"], _SENTINEL["assistant"]

    def chat(messages, gen=False):
        return render(tokenizer, [{"role": r, "content": c} for r, c in messages], gen)

    def split(text, token, what):
        if text.count(token) != 1:
            raise UserError(f"Modelfile: cannot read the chat template's structure ({what}); write TEMPLATE by hand")
        return text.split(token)

    try:
        user_only = chat([("user", u)])
        with_system = chat([("system", s), ("user", u)])
        if _folded(user_only, with_system, s, u):
            return _derive_folded(chat, user_only, with_system, s, u, a, split)
        sys_prefix, sys_suffix = split(chat([("system", s)]), s, "system turn")
        head = sys_prefix + s + sys_suffix
        if not with_system.startswith(head):
            raise UserError("Modelfile: the chat template renders the system turn differently before a user turn")
        user_prefix, user_suffix = split(with_system[len(head) :], u, "user turn")
        with_assistant = chat([("system", s), ("user", u), ("assistant", a)])
        if not with_assistant.startswith(with_system):
            raise UserError("Modelfile: the chat template rewrites earlier turns when an assistant turn follows")
        asst_prefix, asst_suffix = split(with_assistant[len(with_system) :], a, "assistant turn")
        generation = chat([("system", s), ("user", u)], gen=True)[len(with_system) :]
        tail = user_prefix + u + user_suffix
        if not user_only.endswith(tail):
            raise UserError("Modelfile: the chat template renders a first user turn differently without a system turn")
        default_system = user_only[: -len(tail)]
    except UserError:
        raise
    except Exception as err:  # a Jinja template that refuses a lone system turn, raises on roles, ...
        raise UserError(f"Modelfile: cannot probe the chat template ({err}); write TEMPLATE by hand") from None
    return Parts(
        default_system,
        {"system": sys_prefix, "user": user_prefix, "assistant": asst_prefix},
        {"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix},
        generation,
    )


def _folded(user_only: str, with_system: str, s: str, u: str) -> bool:
    """The system message sits inside the first user turn: removing it (and what follows it up to the user's text)
    gives the rendering without a system message."""
    i, j = with_system.find(s), with_system.find(u)
    return 0 <= i < j and with_system[:i] + with_system[j:] == user_only


def _derive_folded(chat, user_only: str, with_system: str, s: str, u: str, a: str, split) -> Parts:
    sep = with_system[with_system.index(s) + len(s) : with_system.index(u)]
    before, user_suffix = split(user_only, u, "user turn")
    with_assistant = chat([("user", u), ("assistant", a)])
    if not with_assistant.startswith(user_only):
        raise UserError("Modelfile: the chat template rewrites earlier turns when an assistant turn follows")
    asst_prefix, asst_suffix = split(with_assistant[len(user_only) :], a, "assistant turn")
    second = chat([("user", u), ("assistant", a), ("user", u)])
    user_prefix = second[len(with_assistant) :].split(u)[0]
    if not before.endswith(user_prefix) or second != with_assistant + user_prefix + u + user_suffix:
        raise UserError("Modelfile: the chat template's later user turns differ from its first; write TEMPLATE by hand")
    generation = chat([("user", u)], gen=True)[len(user_only) :]
    return Parts(
        before[: len(before) - len(user_prefix)],
        {"system": "", "user": user_prefix, "assistant": asst_prefix},
        {"system": "", "user": user_suffix, "assistant": asst_suffix},
        generation,
        system_fold=sep,
    )


def _literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: Parts) -> str:
    """One line of Go template, no trim markers, so every byte of literal text is kept."""
    folded = parts.system_fold is not None
    branches = []
    for n, role in enumerate(ROLES):
        keyword = "if" if n == 0 else "else if"
        content = "{{ $m.Content }}"
        if folded and role == "system":
            content = ""
        elif folded and role == "user":
            content = (
                f"{{{{ if and (eq $i 1) $sys }}}}{{{{ $sys }}}}{_literal(parts.system_fold)}{{{{ end }}}}{content}"
            )
        wrapped = f"{_literal(parts.prefix[role])}{content}{_literal(parts.suffix[role])}"
        branches.append(f'{{{{ {keyword} eq $m.Role "{role}" }}}}{wrapped}')
    default = ""
    if parts.default_system:
        first = "eq $i 0" if folded else 'and (eq $i 0) (ne $m.Role "system")'
        default = f"{{{{ if {first} }}}}{_literal(parts.default_system)}{{{{ end }}}}"
    head = ""
    if folded:  # only a leading system message is folded, as the chat templates do
        head = (
            '{{ $sys := "" }}{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}'
            "{{ $sys = $m.Content }}{{ end }}{{ end }}"
        )
    return (
        head
        + "{{ range $i, $m := .Messages }}"
        + default
        + "".join(branches)
        + "{{ end }}{{ end }}"
        + _literal(parts.generation)
    )


def stop_tokens(tokenizer, parts: Parts) -> list[str]:
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    end_of_turn = parts.suffix["assistant"].strip()
    if end_of_turn:
        stops.append(end_of_turn)
    for token in tokenizer.all_special_tokens:
        if parts.prefix["user"].startswith(token):
            stops.append(token)
    return list(dict.fromkeys(stops))


def modelfile_text(
    gguf_name: str, template: str, stops: list[str], params: dict[str, float | int], adapter: str | None = None
) -> str:
    """FROM the GGUF (and ADAPTER, a GGUF LoRA applied on top of it), the TEMPLATE, stop tokens, parameters."""
    if '"""' in template:
        raise UserError('Modelfile: the chat template contains """, which a Modelfile TEMPLATE cannot hold')
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ rendering


def render_go(template: str, conversations) -> list[str] | None:
    """Render with Go's text/template (Ollama's engine), or None when Go is not installed."""
    go = shutil.which("go")
    if go is None:
        return None
    program = Path(__file__).parent / "render_template.go"
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(
            json.dumps(
                {
                    "template": template,
                    "conversations": [
                        [{"Role": m["role"], "Content": m["content"]} for m in conv] for conv in conversations
                    ],
                }
            )
        )
        out = subprocess.run(
            [go, "run", str(program), str(request)],
            capture_output=True,
            text=True,
            env={
                "GOCACHE": str(Path(tmp) / "gocache"),
                "HOME": tmp,
                "PATH": "/usr/bin:/bin",
                "GOFLAGS": "-mod=mod",
                "GO111MODULE": "off",
            },
        )
    if out.returncode != 0:
        raise UserError(f"Modelfile: Go could not render the TEMPLATE: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def render_python(template: str, conversations) -> list[str]:
    """Interpret the constructs go_template() emits: range over .Messages, if / else if / end, eq / ne / and on
    $i, $m.Role and variables, {{ $m.Content }}, {{ $m.Role }}, string literals, and `$v := ...` / `$v = ...`
    (one scope for the whole template, as Go assigns to the variable declared outside a range)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for match in _ACTION.finditer(template):
        tokens.append(("text", template[pos : match.start()]))
        tokens.append(("action", match.group(1).strip()))
        pos = match.end()
    tokens.append(("text", template[pos:]))

    def value(expr: str, scope: dict):
        expr = expr.strip()
        if expr.startswith('"'):
            return json.loads(expr)
        if expr == "$i":
            return scope["i"]
        if expr in ("$m.Role", "$m.Content"):
            return scope["m"][expr[3:].lower()]
        if expr in variables:
            return variables[expr]
        if re.fullmatch(r"-?\d+", expr):
            return int(expr)
        raise ValueError(f"unsupported expression {expr!r}")

    def cond(expr: str, scope: dict) -> bool:
        expr = expr.strip()
        if expr.startswith("and "):
            parts = re.findall(r"\(([^()]*)\)", expr)
            bare = re.sub(r"\([^()]*\)", " ", expr[4:]).split()
            return all(cond(p, scope) for p in parts) and all(value(b, scope) for b in bare)
        op, a, b = re.match(r'(eq|ne)\s+(\S+|"[^"]*")\s+("[^"]*"|\S+)$', expr).groups()
        return (value(a, scope) == value(b, scope)) == (op == "eq")

    def run(i: int, scope: dict, out: list[str], stop=("end",), live: bool = True) -> int:
        """Render from token i to its closing tag; `live` False walks a branch not taken (no effects)."""
        while i < len(tokens):
            kind, body = tokens[i]
            if kind == "text":
                out.append(body)
                i += 1
            elif body.split(" ", 1)[0] in stop or body.startswith("else"):
                return i
            elif body.startswith("range "):
                end = i + 1
                for n, message in enumerate(scope["messages"]):
                    end = run(i + 1, {**scope, "i": n, "m": message}, out, live=live)
                if not scope["messages"] or not live:
                    end = run(i + 1, scope, [], live=False)
                i = end + 1
            elif body.startswith("if "):
                taken = False
                current = body[3:]
                while True:
                    chosen = live and not taken and (current is None or cond(current, scope))
                    sink = out if chosen else []
                    taken = taken or chosen
                    j = run(i + 1, scope, sink, live=chosen)
                    _, tag = tokens[j]
                    i = j
                    if tag == "end":
                        break
                    current = tag[len("else if ") :] if tag.startswith("else if ") else None
                i += 1
            elif re.match(r"\$\w+\s*:?=", body):
                name, expr = re.match(r"(\$\w+)\s*:?=\s*(.+)$", body).groups()
                if live:
                    variables[name] = value(expr, scope)
                i += 1
            else:
                if live:
                    out.append(str(value(body, scope)))
                i += 1
        return i

    rendered = []
    variables: dict[str, object] = {}
    for conv in conversations:
        variables.clear()
        out: list[str] = []
        run(0, {"messages": conv}, out)
        rendered.append("".join(out))
    return rendered


def prove(tokenizer, template: str) -> dict:
    """Render every proof conversation both ways; the Modelfile proof passes only on byte equality."""
    expected = [render(tokenizer, c) for c in CONVERSATIONS]
    got = render_go(template, CONVERSATIONS)
    renderer = "go text/template"
    if got is None:
        got, renderer = (
            render_python(template, CONVERSATIONS),
            "twin-dpo's interpreter of the TEMPLATE subset (Go not installed)",
        )
    mismatches = [i for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g]
    return {
        "renderer": renderer,
        "conversations": len(CONVERSATIONS),
        "identical": not mismatches,
        "first_mismatch": None
        if not mismatches
        else {"expected": expected[mismatches[0]], "rendered": got[mismatches[0]]},
    }
