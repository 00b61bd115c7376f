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
