# lbstack's image: `lbstack up` as the container's process, one tier per pod on
# Kubernetes (deploy/kubernetes/, docs/deployment.md).
#
#   docker build -t registry.example.com/lbstack:0.1.0 .
#
# Two stages: the venv is built in the first and copied, at the same path, into a clean
# image of the same base, which has no build context and no pip cache.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/lbstack
# The exact versions the tests passed with (constraints.txt), as `make` installs them.
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
RUN /opt/lbstack/bin/pip install -c constraints.txt .

FROM python:3.11-slim
# The fixed uid and gid the manifests run as (securityContext runAsUser, runAsGroup,
# fsGroup): numeric, so the kubelet can check runAsNonRoot.
RUN groupadd --system --gid 10001 lbstack \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin lbstack
COPY --from=build /opt/lbstack /opt/lbstack
# The root filesystem is read-only on Kubernetes: no bytecode written at run time.
ENV PATH=/opt/lbstack/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
# Data (listen / network.port), admin (port + admin_offset), metrics (metrics_listen).
EXPOSE 8080 9080 9464
ENTRYPOINT ["lbstack"]
CMD ["up", "--config", "/etc/lbstack/lbstack.toml"]
