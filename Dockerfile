# The Beam worker image of glam-tf: Beam's Python 3.11 SDK container (its boot program and
# Apache Beam 2.77.0) with glam_tf and its pinned requirements installed. One image for
# every remote runner (docs/scale-out.md, "Runners"):
#   Dataflow        --sdk_container_image=IMAGE
#   Flink, Spark    --environment_type=DOCKER --environment_options=docker_container_image=IMAGE
#   worker pools    docker run IMAGE --worker_pool   (then --environment_type=EXTERNAL)
# Build and push from the repository root:
#   docker build -t REGISTRY/glam-tf-beam:0.1.0 . && docker push REGISTRY/glam-tf-beam:0.1.0
FROM apache/beam_python3.11_sdk:2.77.0
COPY pyproject.toml setup.py README.md requirements.txt /opt/glam-tf/
COPY glam_tf /opt/glam-tf/glam_tf
COPY train_main.py eval_main.py export_main.py build_gldv2_main.py make_synthetic_main.py /opt/glam-tf/
RUN pip install --no-cache-dir /opt/glam-tf
