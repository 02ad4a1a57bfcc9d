"""A stub of an OpenAI-compatible completions server with vLLM's prompt_logprobs, serving a tiny model's real
top-k log-probs (keys "token_id:ID", as with return_tokens_as_token_ids), for tests/test_served.py.

    server, url = serve(model, max_logprobs=20, fail_first=1)   # a thread; server.shutdown() to stop
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def _entries(logp, k, extra=None):
    vals, ids = torch.topk(logp, k)
    d = {f"token_id:{int(i)}": {"logprob": float(v), "rank": r + 1} for r, (v, i) in enumerate(zip(vals, ids))}
    if extra is not None and f"token_id:{extra}" not in d:  # vLLM adds the prompt token with its rank
        rank = int((logp > logp[extra]).sum()) + 1
        d[f"token_id:{extra}"] = {"logprob": float(logp[extra]), "rank": rank}
    return d


def serve(model, max_logprobs=20, fail_first=0):
    state = {"fail": fail_first, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"] += 1
            if state["fail"] > 0:
                state["fail"] -= 1
                self.send_response(503)
                self.end_headers()
                return
            k = min(int(body["logprobs"]), max_logprobs)
            choices = []
            for idx, prompt in enumerate(body["prompt"]):
                with torch.no_grad():
                    out = model(torch.tensor(prompt)[None])
                    logp = torch.log_softmax(getattr(out, "logits", out)[0].float(), -1)
                pl = [None] + [_entries(logp[i - 1], k, prompt[i]) for i in range(1, len(prompt))]
                top = {key: v["logprob"] for key, v in _entries(logp[-1], k).items()}
                choices.append({"index": idx, "text": "", "prompt_logprobs": pl,
                                "logprobs": {"top_logprobs": [top], "tokens": [next(iter(top))]}})
            data = json.dumps({"object": "text_completion", "choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.state = state
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
