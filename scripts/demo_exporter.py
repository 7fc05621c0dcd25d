#!/usr/bin/env python3
"""A tiny Prometheus exporter for the demo: a job-latency histogram that grows by 20 jobs per
second, each taking 10-20 s (so its p95 is 19.5 s). Usage: demo_exporter.py PORT"""
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

START = time.monotonic()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        n = int((time.monotonic() - START) * 20)
        lines = ["# TYPE job_latency_seconds histogram"]
        for le, c in (("1", 0), ("5", 0), ("10", 0), ("20", n), ("+Inf", n)):
            lines.append(f'job_latency_seconds_bucket{{le="{le}"}} {c}')
        lines += [f"job_latency_seconds_sum {n * 15}", f"job_latency_seconds_count {n}", ""]
        body = "\n".join(lines).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
