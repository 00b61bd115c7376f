# Sourced by the bench/device_*.sh scripts, from the repository root on the GPU machine:
# installs the carried wheels (.whl: jax-triton, Grain, ...) into /tmp/site and puts the
# project and them on PYTHONPATH (nothing can be downloaded there).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
