FROM python:3.12-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgqueue ./pgqueue
COPY cli ./cli
COPY migrations ./migrations
COPY examples ./examples
RUN pip install --no-cache-dir . && useradd --system pgqueue
USER pgqueue
ENTRYPOINT []
CMD ["pgqueue", "--help"]
