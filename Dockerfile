# The image every Ray node of this project runs: the KubeRay head, the GPU workers, the Serve replicas and the
# drivers of RayJobs (deploy/kuberay/). No weights and no data go in it: models come from MLflow (models:/...)
# or s3://, corpora from s3://, credentials from a Kubernetes Secret at run time.
#
#   docker build -t ofa-ray:2.60.0-py311-gpu .
#
# Versions have one source, pyproject.toml: Ray 2.60.* and Python 3.11 there, 2.60.0 and py311 here and in every
# manifest's rayVersion and image tag (tests/test_deploy.py fails when they disagree).
#
# CUDA variant: `-gpu`, Ray's alias for the default CUDA build of the release. torch==2.14.1 from PyPI is the
# CUDA 13.0 build and brings its CUDA runtime, cuDNN and NCCL as pip wheels (nvidia-*-cu13), so the toolkit in
# the base image does not bind torch; what binds is the node's NVIDIA driver (CUDA 13.0 needs driver >= 580).
# The NVIDIA base under `-gpu` sets NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES, so the GPU a pod asks
# for is visible in it. The CPU head runs the same image (one image for every node; torch then runs on CPU).
FROM rayproject/ray:2.60.0-py311-gpu

# A headless JRE: pycocoevalcap's PTB tokenizer and METEOR (caption validation and metrics) run java.
USER root
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && java -version

USER ray
WORKDIR /home/ray/ofa-ray

# The pinned dependencies first, read from pyproject.toml, so that a code change does not reinstall torch.
# Ray itself stays the base image's 2.60.0 (the pin is ==2.60.*); only its extras' dependencies are added.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project (1000:100 is the base image's ray:users). The tree stays in the working directory, which
# is where the RayJob entrypoints' relative recipe paths (configs/...) are read from.
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import ray, torch, ofa_model, pipelines, serve_app, tune; assert ray.__version__.startswith('2.60.'), ray.__version__"
