# One image for every Kinshasa process; the compose file picks the process by command.
FROM python:3.11-slim
WORKDIR /app
COPY requirements/runtime.lock ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY kinshasa ./kinshasa
RUN pip install --no-cache-dir --no-deps .
ENV KINSHASA_DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["kinshasa"]
