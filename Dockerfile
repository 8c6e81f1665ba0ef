# One image for web, worker and beat; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The settings create var/ (AXIOM_VAR_DIR) at import and collectstatic writes var/static, as this user.
RUN groupadd --system axiom \
    && useradd --system --gid axiom --home-dir /app --no-create-home --shell /usr/sbin/nologin axiom \
    && mkdir -p /app/var \
    && chown axiom:axiom /app/var

WORKDIR /app

# Dependencies first, so that a change to the source does not reinstall them. pyproject.toml declares
# `packages = []`, so `pip install .` installs only the pinned dependencies; README.md is its `readme`.
COPY pyproject.toml README.md ./
RUN pip install . && rm -rf build ./*.egg-info

COPY --chown=axiom:axiom . .

USER axiom

# Hashed, compressed static files for whitenoise. The settings pick the manifest storage from
# STATIC_MANIFEST, so it stays set at run time too. The SECRET_KEY here exists only for this step.
ENV STATIC_MANIFEST=true
RUN SECRET_KEY=build-time-only-not-a-secret python manage.py collectstatic --noinput

EXPOSE 8000

# No HEALTHCHECK here: worker and beat run this image too and would inherit it; compose has one per service.
CMD ["gunicorn", "axiom_grid.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
