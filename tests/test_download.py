"""download.sh against a fake Meta download server on 127.0.0.1.

The server holds a tiny model tree (a few hundred bytes per "shard"), ignores the
query string like Meta's CloudFront URLs do for the file path, honours
``Range: bytes=N-`` (206 / 416) so resumes can be checked, and records every
request. Each test runs ``bash download.sh`` in a subprocess with wget and with
curl, whichever are installed.
"""
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "download.sh"
TOOLS = [t for t in ("wget", "curl") if shutil.which(t)]
MD5_TOOLS = [t for t in ("md5sum", "md5", "openssl") if shutil.which(t)]
QUERY = "Policy=eyJTdGF0ZW1lbnQiOltdfQ__&Signature=abc~def-123&Key-Pair-Id=K2TEST"
VALID = "7B,13B,70B,7B-chat,13B-chat,70B-chat"
SHARDS = {"7B": 1, "13B": 2, "70B": 8}

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed"),
    pytest.mark.skipif(not TOOLS, reason="neither wget nor curl is on PATH; download.sh needs one of them"),
    pytest.mark.skipif(not MD5_TOOLS, reason="no md5 tool (md5sum, md5 or openssl) on PATH"),
]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def payload(name: str, size: int = 700) -> bytes:
    """Deterministic fake binary content; .pth files start like a zip archive."""
    out = b"PK\x03\x04" if name.endswith(".pth") else b"\x0a\x11"
    seed = name.encode()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return out[:size]


def model_tree() -> dict:
    files = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
        "tokenizer.model": payload("tokenizer.model", 500),
    }
    files["tokenizer_checklist.chk"] = f"{md5(files['tokenizer.model'])}  tokenizer.model\n".encode()
    for size, n in SHARDS.items():
        for chat in ("", "-chat"):
            folder = f"llama-2-{size.lower()}{chat}"
            lines = []
            for s in range(n):
                name = f"consolidated.{s:02d}.pth"
                files[f"{folder}/{name}"] = payload(f"{folder}/{name}")
                lines.append(f"{md5(files[f'{folder}/{name}'])}  {name}")
            files[f"{folder}/params.json"] = b'{"dim": 64, "n_layers": 2, "n_heads": 2}\n'
            lines.append(f"{md5(files[f'{folder}/params.json'])}  params.json")
            files[f"{folder}/checklist.chk"] = ("\n".join(lines) + "\n").encode()
    return files


FORBIDDEN = (403, b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code>"
             b"<Message>Access denied</Message></Error>", "application/xml")


class FakeMeta:
    def __init__(self):
        self.files = model_tree()
        self.overrides = {}  # path -> (status, body, content type), served without Range support
        self.requests = []  # (raw request path, Range header)
        self.lock = threading.Lock()

    def paths(self):
        with self.lock:
            return [urlsplit(p).path.lstrip("/") for p, _ in self.requests]


def make_handler(state: FakeMeta):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a server thread for long

        def log_message(self, *args):
            pass

        def send(self, status, body, ctype="application/octet-stream", extra=()):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append((self.path, rng))
            path = urlsplit(self.path).path.lstrip("/")  # the query string is ignored
            if path in state.overrides:
                return self.send(*state.overrides[path])
            if path not in state.files:
                return self.send(404, b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>",
                                 "application/xml")
            body = state.files[path]
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes="):-1])
                if start >= len(body):
                    return self.send(416, b"", extra=[("Content-Range", f"bytes */{len(body)}")])
                return self.send(206, body[start:],
                                 extra=[("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")])
            return self.send(200, body)

    return Handler


@pytest.fixture
def server():
    state = FakeMeta()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    state.url = f"{state.base}/*?{QUERY}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(params=TOOLS or ["none"])
def tool(request):
    return request.param


def run(tmp_path, tool, args=(), env=None, stdin="", timeout=25):
    """bash download.sh in its own process group, killed as a whole on timeout."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items()
                if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
                and k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "LLAMA_DOWNLOAD_TOOL",
                              "LLAMA_DOWNLOAD_MIRROR",
                              "LLAMA_MD5_TOOL", "WGETRC", "CURL_HOME")}
    # The fake server is a "mirror" (http on 127.0.0.1), which the script accepts only when told so.
    full_env.update(HOME=str(home), no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
                    LLAMA_DOWNLOAD_TOOL=tool, LLAMA_DOWNLOAD_MIRROR="1")
    full_env.update(env or {})
    proc = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full_env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"download.sh did not finish in {timeout}s\n{out}\n{err}")
    return proc.returncode, out, err


def non_interactive(server, target, models="7B"):
    return {"PRESIGNED_URL": server.url, "MODEL_SIZE": models, "TARGET_FOLDER": str(target)}


def assert_model(server, target, folder, shards):
    for name in ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]:
        assert (target / name).read_bytes() == server.files[name], name
    for name in [f"consolidated.{s:02d}.pth" for s in range(shards)] + ["params.json", "checklist.chk"]:
        assert (target / folder / name).read_bytes() == server.files[f"{folder}/{name}"], name
    assert not list(target.rglob("*.part"))


def test_good_path_7b_with_query_string(server, tool, tmp_path):
    target = tmp_path / "weights"
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target, "7B"))
    assert rc == 0, out + err
    assert_model(server, target, "llama-2-7b", 1)
    assert "ok   " + str(target / "llama-2-7b" / "consolidated.00.pth") + " (md5 verified)" in out
    assert "checksums match" in out
    assert "Signature=" not in out + err  # the signed URL stays out of logs
    assert not (target / "llama-2-7b-chat").exists()
    # Every request is the file path in place of the '*', with the query string intact.
    for raw, _ in server.requests:
        assert raw.endswith("?" + QUERY), raw
    assert "/llama-2-7b/consolidated.00.pth?" + QUERY in [raw for raw, _ in server.requests]


def test_flags_and_multi_shard_model(server, tmp_path):
    target = tmp_path / "w"
    rc, out, err = run(tmp_path, TOOLS[-1], ["--url", server.url, "--models", "13b-CHAT", "--target", str(target)])
    assert rc == 0, out + err
    assert_model(server, target, "llama-2-13b-chat", 2)


def test_interactive_prompts(server, tool, tmp_path):
    rc, out, err = run(tmp_path, tool, stdin=f"{server.url}\n7B-chat\n")
    assert rc == 0, out + err
    assert_model(server, tmp_path, "llama-2-7b-chat", 1)  # TARGET_FOLDER defaults to "."


def test_interactive_enter_means_all_models(server, tmp_path):
    rc, out, err = run(tmp_path, TOOLS[0], env={"TARGET_FOLDER": "all"}, stdin=f"{server.url}\n\n")
    assert rc == 0, out + err
    for size, n in SHARDS.items():
        for chat in ("", "-chat"):
            assert_model(server, tmp_path / "all", f"llama-2-{size.lower()}{chat}", n)


def test_corrupted_shard_fails_checksum(server, tool, tmp_path):
    target = tmp_path / "w"
    server.files["llama-2-7b/consolidated.00.pth"] = payload("something else")
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 1, out + err
    assert "checksum mismatch" in err and "consolidated.00.pth" in err
    assert not (target / "llama-2-7b" / "consolidated.00.pth").exists()  # never under the final name
    assert (target / "llama-2-7b" / "consolidated.00.pth.part").exists()  # kept for inspection
    assert (target / "llama-2-7b" / "params.json").exists()  # the other files still came


@pytest.mark.parametrize("body", [
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n",
    b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>"
    b"<Message>Request has expired</Message></Error>",
], ids=["html", "xml"])
def test_error_page_instead_of_shard_is_removed(server, tool, tmp_path, body):
    target = tmp_path / "w"
    server.overrides["llama-2-7b/consolidated.00.pth"] = (200, body, "text/html")
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 1, out + err
    assert "error page" in err and "consolidated.00.pth" in err
    assert not (target / "llama-2-7b" / "consolidated.00.pth").exists()
    assert not (target / "llama-2-7b" / "consolidated.00.pth.part").exists()
    if b"AccessDenied" in body:
        assert "AccessDenied" in err


def test_403_says_link_expired(server, tool, tmp_path):
    target = tmp_path / "w"
    server.overrides["llama-2-7b/consolidated.00.pth"] = FORBIDDEN
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 1, out + err
    assert "403" in err and "expired" in err and "request a new one" in err
    assert "Signature=" not in out + err
    assert (target / "tokenizer.model").read_bytes() == server.files["tokenizer.model"]  # finished files kept
    assert not list((target / "llama-2-7b").glob("consolidated*"))  # no empty file left behind


def test_404_is_reported(server, tool, tmp_path):
    del server.files["llama-2-7b/params.json"]
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, tmp_path / "w"))
    assert rc == 1, out + err
    assert "404" in err and "params.json" in err


@pytest.mark.parametrize("models", ["7B,8B", "llama-3-8b", "7B,chat"])
def test_unknown_model_is_rejected_before_downloading(server, tmp_path, models):
    rc, out, err = run(tmp_path, TOOLS[0], env=non_interactive(server, tmp_path / "w", models))
    assert rc == 2, out + err
    assert "unknown model" in err and VALID in err
    assert server.requests == []


@pytest.mark.parametrize("make_url, expect", [
    (lambda b: f"{b}/llama-2-7b/consolidated.00.pth?{QUERY}", "no '*'"),
    (lambda b: f"{b}/*", "no query string"),
    (lambda b: f"{b}/*?", "no query string"),
    (lambda b: "ftp://127.0.0.1/*?" + QUERY, "must start with https://"),
    (lambda b: "https://l.facebook.com/l.php?u=https%3A%2F%2Fdownload.llamameta.net%2F%2A%3FPolicy%3Dx", "redirect"),
    (lambda b: "https://urldefense.com/v3/__https://download.llamameta.net/*?Policy=x__;Kg!!abc$", "redirect"),
    (lambda b: "https://links.example.com/ls/click?upn=abc%2Adef", "%2A"),
    (lambda b: f"{b}/?file=*", "query string"),
], ids=["no-star", "no-query", "empty-query", "ftp", "facebook-redirect", "urldefense", "encoded-star",
        "star-in-query"])
def test_non_presigned_url_is_rejected(server, tmp_path, make_url, expect):
    rc, out, err = run(tmp_path, TOOLS[0], env={"PRESIGNED_URL": make_url(server.base), "MODEL_SIZE": "7B",
                                                "TARGET_FOLDER": str(tmp_path / "w")})
    assert rc == 2, out + err
    assert expect in err and "download.llamameta.net/*?Policy=" in err  # says what to copy
    assert server.requests == []
    assert not (tmp_path / "w").exists()


def test_url_pasted_with_quotes_and_spaces_is_accepted(server, tmp_path):
    rc, out, err = run(tmp_path, TOOLS[-1], stdin=f"  '{server.url}' \n7B\n")
    assert rc == 0, out + err


def test_existing_good_file_is_kept_and_not_downloaded(server, tool, tmp_path):
    target = tmp_path / "w"
    shard = target / "llama-2-7b" / "consolidated.00.pth"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(server.files["llama-2-7b/consolidated.00.pth"])
    os.utime(shard, (1_000_000_000, 1_000_000_000))
    inode = shard.stat().st_ino
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 0, out + err
    assert "already downloaded, md5 verified" in out
    assert "llama-2-7b/consolidated.00.pth" not in server.paths()
    assert shard.stat().st_ino == inode and shard.stat().st_mtime == 1_000_000_000
    assert_model(server, target, "llama-2-7b", 1)
    # A second run downloads nothing but the (already present) small files are kept too.
    server.requests.clear()
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 0, out + err
    assert server.requests == []


def test_partial_download_is_resumed(server, tool, tmp_path):
    target = tmp_path / "w"
    data = server.files["llama-2-7b/consolidated.00.pth"]
    part = target / "llama-2-7b" / "consolidated.00.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:300])
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 0, out + err
    assert ("/llama-2-7b/consolidated.00.pth?" + QUERY, "bytes=300-") in server.requests
    assert_model(server, target, "llama-2-7b", 1)


def test_interrupted_file_under_final_name_is_resumed_not_deleted(server, tool, tmp_path):
    # Meta's own script downloads in place: an interrupted shard has the final name.
    target = tmp_path / "w"
    data = server.files["llama-2-7b/consolidated.00.pth"]
    shard = target / "llama-2-7b" / "consolidated.00.pth"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(data[:200])
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 0, out + err
    assert ("/llama-2-7b/consolidated.00.pth?" + QUERY, "bytes=200-") in server.requests
    assert shard.read_bytes() == data


def test_complete_but_corrupt_file_is_kept_for_the_user(server, tool, tmp_path):
    target = tmp_path / "w"
    data = bytearray(server.files["llama-2-7b/consolidated.00.pth"])
    data[100] ^= 0xFF
    shard = target / "llama-2-7b" / "consolidated.00.pth"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(bytes(data))
    rc, out, err = run(tmp_path, tool, env=non_interactive(server, target))
    assert rc == 1, out + err
    assert "checksum mismatch" in err and "delete it" in err
    assert (target / "llama-2-7b" / "consolidated.00.pth.part").read_bytes() == bytes(data)


def test_leftover_error_page_is_replaced(server, tmp_path):
    target = tmp_path / "w"
    tok = target / "tokenizer.model"
    tok.parent.mkdir(parents=True)
    tok.write_bytes(FORBIDDEN[1])
    rc, out, err = run(tmp_path, TOOLS[0], env=non_interactive(server, target))
    assert rc == 0, out + err
    assert "error page from an earlier attempt" in out
    assert tok.read_bytes() == server.files["tokenizer.model"]


def test_macos_md5_r_verification(server, tmp_path):
    """The macOS branch (md5 -r) really compares sums: a fake `md5` stands in for the BSD tool."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "md5"
    fake.write_text(f"#!{sys.executable}\n"
                    "import hashlib, sys\n"
                    "assert sys.argv[1] == '-r', sys.argv\n"
                    "for f in sys.argv[2:]:\n"
                    "    print(hashlib.md5(open(f, 'rb').read()).hexdigest(), f)\n")
    fake.chmod(0o755)
    env = {"LLAMA_MD5_TOOL": "md5", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    rc, out, err = run(tmp_path, TOOLS[0], env={**non_interactive(server, tmp_path / "good"), **env})
    assert rc == 0, out + err
    assert "checksums with md5" in out
    server.files["llama-2-7b/params.json"] = b'{"dim": 65}\n'
    rc, out, err = run(tmp_path, TOOLS[0], env={**non_interactive(server, tmp_path / "bad"), **env})
    assert rc == 1, out + err
    assert "checksum mismatch" in err and "params.json" in err


def test_missing_model_list_without_input_is_an_error(server, tmp_path):
    rc, out, err = run(tmp_path, TOOLS[0], env={"PRESIGNED_URL": server.url, "TARGET_FOLDER": str(tmp_path)})
    assert rc == 2, out + err
    assert "--models" in err and server.requests == []


def test_help():
    rc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=10,
                        stdin=subprocess.DEVNULL)
    assert rc.returncode == 0
    for word in ("--url", "--models", "--target", "PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", VALID):
        assert word in rc.stdout


@pytest.mark.parametrize("url,expect", [
    (f"http://download.llamameta.net/*?{QUERY}", "starts with http://"),
    (f"https://download.llamameta.net.evil.example/*?{QUERY}", "host is 'download.llamameta.net.evil.example'"),
    (f"https://download.llamameta.net@evil.example/*?{QUERY}", "host is 'evil.example'"),
    (f"https://evil.example/download.llamameta.net/*?{QUERY}", "host is 'evil.example'"),
], ids=["http", "lookalike-host", "userinfo", "host-in-path"])
def test_only_https_on_metas_host_without_mirror(tmp_path, url, expect):
    rc, out, err = run(tmp_path, TOOLS[0], env={"PRESIGNED_URL": url, "MODEL_SIZE": "7B", "LLAMA_DOWNLOAD_MIRROR": "",
                                                "TARGET_FOLDER": str(tmp_path / "w")})
    assert rc == 2 and expect in err and "--mirror" in err, out + err
    assert not (tmp_path / "w").exists()


def test_mirror_flag_allows_another_host(server, tmp_path):
    rc, out, err = run(tmp_path, TOOLS[0], ["--mirror", "--url", server.url, "--models", "7B",
                                             "--target", str(tmp_path / "w")], env={"LLAMA_DOWNLOAD_MIRROR": ""})
    assert rc == 0, out + err
    assert (tmp_path / "w" / "llama-2-7b" / "consolidated.00.pth").is_file()
