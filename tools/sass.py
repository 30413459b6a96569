"""Reading SASS (cuobjdump -sass) as a cost: instructions, their classes, and the loops they sit in.

The static cost model (tools/cost_model.py) asks one thing of a compiled kernel: how many warp-instructions
of each kind one warp issues per iteration of its bank loop, and per program outside it. A loop in SASS is
an address range closed by a backward branch (`BRA` to an earlier address); loops nest by containment. An
instruction's execution count is the product of the trip counts of the loops around it, which the caller
supplies (the kernels' trip counts are plan values, not visible in the binary).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. HGMMA.64x64x16.F32.BF16
    operands: str
    pred: str = ""  # the guard predicate, e.g. "@!P0" ("" when unconditional)

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    children: list["Loop"] = field(default_factory=list)
    parent: "Loop | None" = None

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1


def disassemble(cubin: bytes, cuobjdump: str | None = None) -> str:
    if cuobjdump is None:
        from triton import knobs
        cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def parse(sass: str) -> list[Instr]:
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), m.group(2) or ""))
    return out


def live(instrs: list[Instr]) -> set[int]:
    """Addresses reachable from the entry without taking a cold edge: a `BRA.DIV` (taken only by a warp that
    arrives diverged at a warp-synchronous instruction; nvcc places that fallback after the EXIT and branches
    back) or a `CALL` (nvcc's out-of-line slow paths of division and square root, for operands near the ends
    of the range). An indirect `BRX` is assumed to fall through: its jump table lands just after it."""
    at = {ins.addr: k for k, ins in enumerate(instrs)}
    seen: set[int] = set()
    todo = [0] if instrs else []
    while todo:
        k = todo.pop()
        if k >= len(instrs) or instrs[k].addr in seen:
            continue
        ins = instrs[k]
        seen.add(ins.addr)
        # `@P0 BRA` and `BRA !P0, target` are conditional; `BRA.DIV UR4, target` falls through (its edge is cold).
        unconditional = not ins.pred and not re.match(r"!?U?P[T0-9]+\s*,", ins.operands)
        if ins.op == "BRA" and "DIV" not in ins.opcode.split("."):
            target = re.search(r"0x([0-9a-f]+)", ins.operands)
            if target and int(target.group(1), 16) in at:
                todo.append(at[int(target.group(1), 16)])
            if unconditional:
                continue
        elif ins.op in ("EXIT", "RET") and unconditional:
            continue
        todo.append(k + 1)
    return seen


def loops(instrs: list[Instr], live_addrs: set[int] | None = None) -> list[Loop]:
    """Top-level loops (each with its nested children) from the backward branches (with live_addrs: only
    those of live instructions, see live())."""
    spans: dict[int, int] = {}
    for ins in instrs:
        if live_addrs is not None and ins.addr not in live_addrs:
            continue
        if ins.op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", ins.operands)
            if target and int(target.group(1), 16) <= ins.addr:
                t = int(target.group(1), 16)
                spans[t] = max(spans.get(t, t), ins.addr)
    # Outer loops first (earlier start, later end), then attach each loop to the innermost one containing it.
    ordered = sorted((Loop(s, e) for s, e in spans.items()), key=lambda l: (l.start, -l.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for lp in ordered:
        while stack and not (stack[-1].start <= lp.start and lp.end <= stack[-1].end):
            stack.pop()
        if stack:
            lp.parent = stack[-1]
            stack[-1].children.append(lp)
        else:
            roots.append(lp)
        stack.append(lp)
    return roots


def all_loops(roots: list[Loop]) -> list[Loop]:
    out = []
    for r in roots:
        out.append(r)
        out.extend(all_loops(r.children))
    return out


def innermost(roots: list[Loop], addr: int) -> Loop | None:
    for r in roots:
        if r.contains(addr):
            return innermost(r.children, addr) or r
    return None


# --- what one warp-instruction is worth -------------------------------------------------------------------

MUFU_LANES = 32  # a MUFU warp-instruction is 32 lane operations on the SFU pipe


def mma_flops(ins: Instr) -> int:
    """Tensor-core FLOPs one warp's issue of this instruction contributes (0 for anything else).

    mma.sync (HMMA/DMMA/IMMA .MNK, e.g. HMMA.16816 = m16n8k16) is a whole warp's product. A warpgroup MMA
    (HGMMA.64xNxK) is issued by each of the warpgroup's 4 warps for one 64 x N x K product, so each issue
    is a quarter of it."""
    if ins.op in ("HMMA", "DMMA", "IMMA"):
        mod = ins.opcode.split(".")[1]
        shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32), "1684": (16, 8, 4)}
        m, n, k = shapes.get(mod, (16, 8, 16))
        return 2 * m * n * k
    if ins.op == "HGMMA":
        m, n, k = (int(x) for x in _SHAPE.search(ins.opcode).groups())
        return 2 * m * n * k // 4
    return 0


def global_bytes_per_lane(ins: Instr) -> int:
    """Bytes one lane moves between the SM and L2 for a global load/store/async copy (0 otherwise)."""
    if ins.op not in ("LDG", "STG", "LDGSTS", "RED", "ATOMG"):
        return 0
    mods = ins.opcode.split(".")[1:]
    for width, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in mods:
            return size
    return 4

