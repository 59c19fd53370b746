# jaxlm's container image: Python, jaxlm's requirements with JAX for one accelerator, and
# jaxlm itself, run by a non-root user (uid 1000). Build it from the repository root:
#
#   docker build -t jaxlm:cpu .                                   # CPU (jax[cpu])
#   docker build --build-arg ACCELERATOR=cuda12 -t jaxlm:cuda12 . # NVIDIA GPUs (jax[cuda12])
#   docker build --build-arg ACCELERATOR=tpu -t jaxlm:tpu .       # Cloud TPU (jax[tpu], libtpu)
#   docker run --rm jaxlm:cpu python -m jaxlm.main --config=configs/gpt/debug.py --workdir=/tmp/run
#
# JAX_VERSION is the jax the tests ran with (requirements.txt admits a range; the image pins
# one), installed with the accelerator's extra in the same pip resolution as requirements.txt,
# so pip cannot pick another jax. PYTHON_VERSION is the Python they ran with.
# The gcs extra's packages come with them (gs:// workdirs, as launch/gke.py runs the image).
# tests/test_docker.py checks both, and these install lines, against requirements.txt and
# pyproject.toml's gcs extra.
# The working directory holds the checkout (configs/ included), so --config=configs/... works;
# launch/gke.py runs the image on GKE.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG ACCELERATOR=cpu
ARG JAX_VERSION=0.10.2
# libtpu's release page, besides PyPI (JAX's installation guide for TPUs).
ARG LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# /usr/local/nvidia/lib64: where GKE mounts the NVIDIA driver's libraries into GPU pods.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64

RUN python -m venv /opt/venv
WORKDIR /opt/jaxlm

# The requirements first, in a layer of their own: code changes do not reinstall them.
COPY requirements.txt ./
RUN case "$ACCELERATOR" in \
      cpu|cuda12) links="" ;; \
      tpu) links="--find-links=$LIBTPU_FIND_LINKS" ;; \
      *) echo "ACCELERATOR=$ACCELERATOR: expected cpu, cuda12 or tpu" >&2; exit 2 ;; \
    esac && \
    pip install $links -r requirements.txt "jax[$ACCELERATOR]==$JAX_VERSION" \
      "gcsfs>=2024.2" "google-cloud-storage>=2.14,<4"

COPY . .
RUN pip install --no-deps . && pip check

RUN groupadd --gid 1000 jaxlm && useradd --uid 1000 --gid 1000 --create-home jaxlm
USER 1000:1000

CMD ["python", "-m", "jaxlm"]
