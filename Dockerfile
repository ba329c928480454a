# rankgate serving the example project (examples/open_bandit) on port 8000.
#
#   docker build -t rankgate .
#   docker run --rm -p 8000:8000 rankgate                  # embedded Redis, state in the container
#   docker run --rm -p 8000:8000 rankgate serve --host 0.0.0.0 --port 8000 --demo-consent
#                                       # the example's demo users with made-up consent, as ./run
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://… -e RANKGATE_USER_KEY_SECRET=… rankgate
#   docker run --rm rankgate keys create demo-shop --purpose onsite_personalization
#
# On start `rankgate serve` runs `rankgate setup` (a check when the home is set up;
# no demo consent unless `--demo-consent`: a project's people give their own),
# then Ray Serve, listening on 0.0.0.0. It is the container's PID 1: it handles
# SIGTERM (`docker stop`) and SIGINT, reaps orphans, and stops what is left before
# it ends (docs/operating.md, "Running the server"). The same image runs the Ray head and worker
# pods of deploy/kuberay/rayservice.yaml.
#
# Ray's own image: the Ray version rankgate pins (ray[serve]==2.60.0, checked by
# tests/deploy/test_container.py) and the tools KubeRay's probes run (bash, wget).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu

# -- build: the wheel, exactly as a user builds it ------------------------------
FROM ${RAY_IMAGE} AS build
WORKDIR /home/ray/src
COPY --chown=ray:users . .
RUN python -m pip wheel --no-deps --wheel-dir /home/ray/wheels .

# -- run: the wheel installed (not editable), the example project beside it ----
FROM ${RAY_IMAGE}
USER ray
WORKDIR /home/ray
COPY --from=build --chown=ray:users /home/ray/wheels /tmp/wheels
RUN python -m pip install --no-cache-dir /tmp/wheels/rankgate-*.whl && rm -rf /tmp/wheels
COPY --chown=ray:users examples/open_bandit /home/ray/project
# RANKGATE_HOME: mount a volume here to keep the set-up home (models, Feast
# registry, embedded Redis data) across containers.
ENV RANKGATE_PROJECT=/home/ray/project \
    RANKGATE_HOME=/home/ray/home
EXPOSE 8000
HEALTHCHECK --start-period=180s --interval=15s --timeout=3s \
    CMD wget -q -O /dev/null http://127.0.0.1:8000/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["rankgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
