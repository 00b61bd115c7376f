"""bench/hlo_memory.py's liveness walk on small hand-written scheduled modules."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import hlo_memory  # noqa: E402  pylint: disable=wrong-import-position

MODULE = """HloModule m, is_scheduled=true

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %a = f32[1024]{0} broadcast(f32[256]{0} %p0), dimensions={}
  %b = f32[2048]{0} broadcast(f32[256]{0} %p0), dimensions={}
  %t = (f32[1024]{0}, f32[2048]{0}) tuple(f32[1024]{0} %a, f32[2048]{0} %b)
  %ob = (f32[1024]{0}, f32[2048]{0}) opt-barrier((f32[1024]{0}, f32[2048]{0}) %t)
  %ga = f32[1024]{0} get-tuple-element((f32[1024]{0}, f32[2048]{0}) %ob), index=0
  %gb = f32[2048]{0} get-tuple-element((f32[1024]{0}, f32[2048]{0}) %ob), index=1
  %c = f32[256]{0} slice(f32[2048]{0} %gb), slice={[0:256]}
  %d = f32[512]{0} broadcast(f32[256]{0} %c), dimensions={}
  %e = f32[256]{0} slice(f32[1024]{0} %ga), slice={[0:256]}
  ROOT %r = f32[256]{0} add(f32[256]{0} %e, f32[256]{0} %p0)
}
"""


def test_a_barriers_elements_live_as_long_as_their_own_readers():
  """b (8 KiB) is last read by c, before d is made: at d, a and c and d are live, not b.
  Through the barrier's union, b would live to a's last reader (e) and the peak would
  hold it."""
  ins = hlo_memory.entry_instructions(MODULE)
  peak, at, live, _, size = hlo_memory.walk(ins)
  names = [d[0] for d in ins]
  assert {"a", "b"} <= set(size)
  # peak: when c is made from b (an output is made before its inputs are freed)
  assert peak == 4096 + 8192 + 1024 and names[at] == "c"
  # after c reads b, b is freed: when d is made, live = a, c, d
  curve = hlo_memory.walk(ins)[3]
  assert curve[names.index("d")] == 4096 + 1024 + 2048


# The same as MODULE, with the elements read as newer XLA prints them: no
# get-tuple-element, the operand ``%t#k`` names element k of a tuple-shaped output.
HASH_ELEMENTS = """HloModule m, is_scheduled=true

%fused (x: f32[256]) -> (f32[1024], f32[2048]) {
  %x = f32[256]{0} parameter(0)
  %xa = f32[1024]{0} broadcast(f32[256]{0} %x), dimensions={}
  %xb = f32[2048]{0} broadcast(f32[256]{0} %x), dimensions={}
  ROOT %xt = (f32[1024]{0}, f32[2048]{0}) tuple(f32[1024]{0} %xa, f32[2048]{0} %xb)
}

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %t = (f32[1024]{0}, f32[2048]{0}) fusion(f32[256]{0} %p0), kind=kLoop, calls=%fused
  %c = f32[256]{0} slice(f32[2048]{0} %t#1), slice={[0:256]}
  %d = f32[512]{0} broadcast(f32[256]{0} %c), dimensions={}
  %e = f32[256]{0} slice(f32[1024]{0} %t#0), slice={[0:256]}
  ROOT %r = f32[256]{0} add(f32[256]{0} %e, f32[256]{0} %p0)
}
"""


def test_elements_read_as_name_hash_k_live_as_long_as_their_own_readers():
  """t#1 (8 KiB) is last read by c: when d is made, t#0, c and d are live, not t#1. Read
  as all of t, t#1 would live until e reads t#0, and be counted at d."""
  ins = hlo_memory.entry_instructions(HASH_ELEMENTS)
  assert [d[3] for d in ins if d[0] == "c"] == [["t#1"]]
  _, _, _, curve, size = hlo_memory.walk(ins)
  names = [d[0] for d in ins]
  assert size["t#0"] == 4096 and size["t#1"] == 8192
  assert curve[names.index("c")] == 4096 + 8192 + 1024
  assert curve[names.index("d")] == 4096 + 1024 + 2048


UNREAD = """HloModule m, is_scheduled=true

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %g = (f32[256]{0}, s8[4096]{0}) custom-call(f32[256]{0} %p0), custom_call_target="__cublas$gemm"
  %d = f32[512]{0} broadcast(f32[256]{0} %g#0), dimensions={}
  %e = f32[256]{0} slice(f32[512]{0} %d), slice={[0:256]}
  ROOT %r = f32[256]{0} add(f32[256]{0} %e, f32[256]{0} %p0)
}
"""


def test_an_element_nobody_reads_is_freed_where_it_is_made():
  """The GEMM's workspace (g#1, 4 KiB) is read by nothing: live while g is made, not
  after (held to the end it would add 4 KiB to every later point)."""
  ins = hlo_memory.entry_instructions(UNREAD)
  peak, at, _, curve, _ = hlo_memory.walk(ins)
  names = [d[0] for d in ins]
  assert curve[names.index("g")] == 1024 + 4096
  assert curve[names.index("d")] == 1024 + 2048
  assert peak == 1024 + 4096 and names[at] == "g"


EARLY = """HloModule m, is_scheduled=true

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %early = f32[1024]{0} broadcast(f32[256]{0} %p0), dimensions={}, metadata={op_name="jit(f)/transpose(jvp(g))/rows"}
  %view = f32[1024]{0} bitcast(f32[1024]{0} %early)
  %big = f32[2048]{0} broadcast(f32[256]{0} %p0), dimensions={}, metadata={op_name="jit(f)/jvp(g)/big"}
  %c = f32[256]{0} slice(f32[2048]{0} %big), slice={[0:256]}
  %e = f32[256]{0} slice(f32[1024]{0} %view), slice={[0:256]}
  ROOT %r = f32[256]{0} add(f32[256]{0} %e, f32[256]{0} %c)
}
"""


def test_defer_moves_an_early_value_and_its_views_to_its_first_reader():
  """early (4 KiB) is made first and read last, through a bitcast: at big it is live
  (peak 4 + 8 + 1 KiB when c is made). Deferred, it and its view go just before e, after
  big is freed: the peak is big and c, 8 + 1 KiB. Nothing else moves."""
  ins = hlo_memory.entry_instructions(EARLY)
  assert hlo_memory.walk(ins)[0] == 4096 + 8192 + 1024
  moved, n = hlo_memory.defer(ins, r"transpose\(.*/rows")
  assert n == 1
  assert [d[0] for d in moved] == ["p0", "big", "c", "early", "view", "e", "r"]
  assert hlo_memory.walk(moved)[0] == 8192 + 1024


def test_a_gzipped_module_reads_as_the_text(tmp_path, capsys):
  """report() of the module gzipped (bench/memory.sh's HLO_KEEP=1) prints what it prints
  for the plain text: the same peak, instruction and list."""
  import gzip  # noqa: PLC0415
  plain, packed = tmp_path / "m.after_optimizations.txt", tmp_path / "m.txt.gz"
  plain.write_text(MODULE)
  with gzip.open(packed, "wt") as f:
    f.write(MODULE)
  hlo_memory.report(str(plain))
  want = capsys.readouterr().out.split("\n", 1)[1]     # the first line names the file
  hlo_memory.report(str(packed))
  got = capsys.readouterr().out.split("\n", 1)[1]
  assert "peak of the buffers it makes" in want and got == want


CALLED = """HloModule big, is_scheduled=true, entry_computation_layout={(f32[256]{0})->f32[256]{0}}

%fused (x: f32[256]) -> f32[1024] {
  %x = f32[256]{0} parameter(0)
  ROOT %y = f32[1024]{0} broadcast(f32[256]{0} %x), dimensions={}
}

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0), metadata={op_name="jit(f)/in" source_file="a.py" source_line=3}
  %a = f32[1024]{0} fusion(f32[256]{0} %p0), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/jvp(g)/mul" source_file="a.py" source_line=4}, backend_config={"outer_dimension_partitions":[]}
  %k = (f32[2048]{0}, s8[64]{0}) custom-call(f32[1024]{0} %a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/transpose(jvp(g))/kernel"}, backend_config={"name":"kernel","ir":"IR"}
  %kb = f32[2048]{0} get-tuple-element((f32[2048]{0}, s8[64]{0}) %k), index=0
  %c = f32[256]{0} slice(f32[2048]{0} %kb), slice={[0:256]}
  ROOT %r = f32[256]{0} add(f32[256]{0} %c, f32[256]{0} %p0), metadata={op_name="jit(f)/add"}
}
""".replace("IR", "x" * 5000)


def test_a_stripped_module_reports_as_the_whole(tmp_path, capsys, monkeypatch):
  """strip_module (bench/memory.sh's HLO_KEEP=1, through --strip-to) keeps what the walk
  reads: the same instructions, sizes, tuple indices and JAX names, hence the same
  report; the called computation and the kernel's backend config are gone."""
  small = hlo_memory.strip_module(CALLED)
  assert len(small) < len(CALLED) / 4
  assert "backend_config" not in small and "%fused" not in small and "source_line" not in small
  assert hlo_memory.entry_instructions(small) == hlo_memory.entry_instructions(CALLED)
  whole, packed = tmp_path / "m.after_optimizations.txt", tmp_path / "s.txt.gz"
  whole.write_text(CALLED)
  monkeypatch.setattr(sys, "argv", ["hlo_memory.py", str(whole), "--strip-to", str(packed)])
  hlo_memory.main()
  hlo_memory.report(str(whole))
  want = capsys.readouterr().out.split("\n", 1)[1]
  hlo_memory.report(str(packed))
  got = capsys.readouterr().out.split("\n", 1)[1]
  assert "jvp(g)/mul" in want and "peak of the buffers it makes" in want and got == want


ALIASED = """HloModule k, is_scheduled=true

ENTRY %main (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  %z = f32[4096]{0} broadcast(f32[256]{0} %p0), dimensions={}
  %y = f32[4096]{0} custom-call(f32[256]{0} %p0, f32[4096]{0} %z), custom_call_target="sum", output_to_operand_aliasing={{}: (1, {})}, backend_config={"a":{"b":1}}
  %z2 = f32[2048]{0} broadcast(f32[256]{0} %p0), dimensions={}
  %t = (f32[2048]{0}, f32[1024]{0}) custom-call(f32[256]{0} %p0, f32[2048]{0} %z2), custom_call_target="two", output_to_operand_aliasing={{0}: (1, {})}
  %t0 = f32[2048]{0} get-tuple-element((f32[2048]{0}, f32[1024]{0}) %t), index=0
  %t1 = f32[1024]{0} get-tuple-element((f32[2048]{0}, f32[1024]{0}) %t), index=1
  %c = f32[256]{0} slice(f32[4096]{0} %y), slice={[0:256]}
  %d = f32[256]{0} slice(f32[2048]{0} %t0), slice={[0:256]}
  %e = f32[256]{0} slice(f32[1024]{0} %t1), slice={[0:256]}
  %f = f32[256]{0} add(f32[256]{0} %c, f32[256]{0} %d)
  ROOT %r = f32[256]{0} add(f32[256]{0} %f, f32[256]{0} %e)
}
"""


def test_outputs_written_into_operands_are_not_new_buffers():
  """A kernel whose output aliases an operand (output_to_operand_aliasing: atomic sums
  into a zeroed buffer) makes no buffer of its own; the operand lives as long as the
  output's readers. A tuple's aliased element is its operand, the other element new."""
  ins = hlo_memory.entry_instructions(ALIASED)
  by = {d[0]: d for d in ins}
  assert by["y"][7] == ((None, 1),) and by["t"][7] == ((0, 1),)
  peak, at, live, curve, size = hlo_memory.walk(ins)
  assert "y" not in size and "t#0" not in size and size["t#1"] == 4096
  names = [d[0] for d in ins]
  # z (16 KiB) is y: alive until c reads y; at t, z + z2 + t#1 are live
  assert curve[names.index("t")] == 16384 + 8192 + 4096
  # the peak: when c (1 KiB) is made from y, before z is freed
  assert peak == 16384 + 8192 + 4096 + 1024 and names[at] == "c"
  # the stripped module keeps the aliasing
  assert hlo_memory.entry_instructions(hlo_memory.strip_module(ALIASED)) == ins
