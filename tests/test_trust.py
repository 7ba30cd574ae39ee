"""Bundle signatures: who made a bundle, not only whether it is intact.

The checksums of a bundle live inside it: whoever edits a bundle can recompute them, and `inspect` passes (the
first test shows that limit). With `--trust KEY.pub`, an unsigned bundle, one signed by another key and one changed
after signing are refused with one line and exit 2, before anything else in it is read.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import hetrun.bundle.integrity as integrity
from hetrun.bundle import MANIFEST, SIGNATURE, generate_key_pair, load, sign_bundle, verify
from hetrun.cli import main
from hetrun.errors import BundleError, HetrunError

REPO = Path(__file__).resolve().parents[1]


def one_line(capsys, argv, code=2) -> str:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, (argv, rc, err[-400:])
    if code == 2:
        assert err.startswith("hetrun: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err if code == 2 else out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    alice = generate_key_pair(d / "alice")
    mallory = generate_key_pair(d / "mallory")
    return {"alice": alice[0], "alice.pub": alice[1], "mallory": mallory[0], "mallory.pub": mallory[1]}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("signed") / "b"
    assert main(["export", "tiny", "--profile", "mixed-demo", "-o", str(root), "--sign", str(keys["alice"]),
                 "--no-progress"]) == 0
    return root


@pytest.fixture
def bundle(signed, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(signed, root)
    return root


def rehash(root: Path, rel: str) -> None:
    """What anyone who edits a bundle can do: recompute the file's checksum in the manifest."""
    man = json.loads((root / MANIFEST).read_text())
    data = (root / rel).read_bytes()
    man["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (root / MANIFEST).write_text(json.dumps(man, indent=1))


def zero_dense_weights(root: Path) -> None:
    path = root / "dense.safetensors"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n:] = bytes(len(data) - 8 - n)
    path.write_bytes(bytes(data))
    rehash(root, "dense.safetensors")


def edit_generation_config(root: Path) -> None:
    cfg = json.loads((root / "generation_config.json").read_text())
    cfg["eos_token_id"] = 0
    (root / "generation_config.json").write_text(json.dumps(cfg))
    rehash(root, "generation_config.json")


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    out = one_line(capsys, ["keygen", "-o", str(tmp_path / "k"), "--json"], code=0)
    doc = json.loads(out)
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert doc["fingerprint"].startswith("sha256:") and len(doc["fingerprint"]) == 7 + 64
    before = (tmp_path / "k").read_bytes()
    assert "already exists" in one_line(capsys, ["keygen", "-o", str(tmp_path / "k")])
    assert (tmp_path / "k").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("tamper", [zero_dense_weights, edit_generation_config])
def test_checksums_alone_cannot_tell_who_made_a_bundle_a_signature_can(bundle, keys, tamper, capsys):
    tamper(bundle)
    one_line(capsys, ["inspect", str(bundle)], code=0)  # intact as far as its own checksums go: the stated limit
    err = one_line(capsys, ["inspect", str(bundle), "--trust", str(keys["alice.pub"])])
    assert "does not match manifest.json" in err and "changed after it was signed" in err
    err = one_line(capsys, ["run", str(bundle), "--prompt-ids", "1,2,3", "--trust", str(keys["alice.pub"])])
    assert "changed after it was signed" in err
    with pytest.raises(BundleError, match="changed after it was signed"):
        load(bundle, trust=[keys["alice.pub"]])


def test_signed_bundle_runs_with_its_key_and_with_the_environment(bundle, keys, capsys, monkeypatch):
    out = json.loads(one_line(capsys, ["inspect", str(bundle), "--json", "--trust", str(keys["alice.pub"])], code=0))
    assert out["signature"]["verified"] and out["signature"]["key"].startswith("sha256:")
    out = json.loads(one_line(capsys, ["inspect", str(bundle), "--json"], code=0))
    assert out["signature"]["signed"] and not out["signature"]["verified"]  # not checked without a key
    run = json.loads(one_line(capsys, ["run", str(bundle), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json",
                                       "--trust", str(keys["mallory.pub"]), "--trust", str(keys["alice.pub"])],
                              code=0))
    assert len(run["new_ids"]) == 2
    monkeypatch.setenv("HETRUN_TRUST", str(keys["mallory.pub"]))
    assert "not among the 1 trusted key" in one_line(capsys, ["inspect", str(bundle)])
    monkeypatch.setenv("HETRUN_TRUST", os.pathsep.join([str(keys["mallory.pub"]), str(keys["alice.pub"])]))
    one_line(capsys, ["inspect", str(bundle)], code=0)


def test_unsigned_or_foreign_bundles_are_refused_before_anything_else_is_read(bundle, keys, capsys, monkeypatch):
    assert "not among the 1 trusted key" in one_line(capsys, ["inspect", str(bundle), "--trust",
                                                               str(keys["mallory.pub"])])
    (bundle / SIGNATURE).unlink()
    read = []
    real = integrity.read_file
    monkeypatch.setattr(integrity, "read_file", lambda root, rel, *a, **k: read.append(rel) or real(root, rel, *a, **k))
    err = one_line(capsys, ["run", str(bundle), "--prompt-ids", "1,2", "--trust", str(keys["alice.pub"])])
    assert "is not signed" in err
    assert read == [MANIFEST]  # nothing but the manifest was read
    one_line(capsys, ["inspect", str(bundle)], code=0)  # without --trust an unsigned bundle is fine


@pytest.mark.parametrize("signature", [b"", b"{}", b"not json", b'{"format": "hetrun-bundle-signature"}',
                                       b"x" * 10000, "sig-of-other-manifest"])
def test_malformed_or_replayed_signatures(bundle, keys, signature, capsys):
    if signature == "sig-of-other-manifest":  # a real signature by the trusted key, of another manifest
        man = json.loads((bundle / MANIFEST).read_text())
        man["created_utc"] = "2000-01-01T00:00:00+00:00"
        (bundle / MANIFEST).write_text(json.dumps(man))
    else:
        (bundle / SIGNATURE).write_bytes(signature)
    one_line(capsys, ["inspect", str(bundle), "--trust", str(keys["alice.pub"])])


def test_a_symlinked_signature_is_refused(bundle, keys, capsys, tmp_path):
    shutil.copy(bundle / SIGNATURE, tmp_path / "elsewhere.sig")
    (bundle / SIGNATURE).unlink()
    (bundle / SIGNATURE).symlink_to(tmp_path / "elsewhere.sig")
    assert "symlink" in one_line(capsys, ["inspect", str(bundle), "--trust", str(keys["alice.pub"])])


def test_sign_checks_the_whole_bundle_first_then_signs_it(bundle, keys, capsys, tmp_path):
    (bundle / SIGNATURE).unlink()
    one_line(capsys, ["sign", str(bundle), "--key", str(keys["mallory"])], code=0)
    verify(bundle, trust=[keys["mallory.pub"]])
    with pytest.raises(BundleError):
        verify(bundle, trust=[keys["alice.pub"]])
    (bundle / "config.json").write_text("{}")
    assert "config.json" in one_line(capsys, ["sign", str(bundle), "--key", str(keys["alice"])])
    with pytest.raises(BundleError):  # the old signature no longer matches, and no new one was made
        verify(bundle, trust=[keys["mallory.pub"]])
    assert "private key" in one_line(capsys, ["inspect", str(bundle), "--trust", str(keys["alice"])])
    with pytest.raises(HetrunError, match="not a private key"):
        sign_bundle(bundle, keys["alice.pub"])


def test_keys_in_openssl_and_openssh_formats_and_encrypted_keys(bundle, tmp_path, capsys, monkeypatch):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "ssl.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))  # openssl genpkey writes this
    (tmp_path / "id.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH) + b" me@host\n")
    one_line(capsys, ["sign", str(bundle), "--key", str(tmp_path / "ssl.pem")], code=0)
    one_line(capsys, ["inspect", str(bundle), "--trust", str(tmp_path / "id.pub")], code=0)
    monkeypatch.setenv("HETRUN_KEY_PASSPHRASE", "correct horse")
    one_line(capsys, ["keygen", "-o", str(tmp_path / "enc")], code=0)
    assert b"ENCRYPTED" in (tmp_path / "enc").read_bytes()
    one_line(capsys, ["sign", str(bundle), "--key", str(tmp_path / "enc")], code=0)
    one_line(capsys, ["inspect", str(bundle), "--trust", str(tmp_path / "enc.pub")], code=0)
    monkeypatch.setenv("HETRUN_KEY_PASSPHRASE", "wrong")
    assert "passphrase" in one_line(capsys, ["sign", str(bundle), "--key", str(tmp_path / "enc")])
    monkeypatch.delenv("HETRUN_KEY_PASSPHRASE")
    assert "encrypted" in one_line(capsys, ["sign", str(bundle), "--key", str(tmp_path / "enc")])
    (tmp_path / "junk.pub").write_text("hello")
    assert "not a public key" in one_line(capsys, ["inspect", str(bundle), "--trust", str(tmp_path / "junk.pub")])
    assert "not found" in one_line(capsys, ["inspect", str(bundle), "--trust", str(tmp_path / "none.pub")])


def test_a_bad_signing_key_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import hetrun.bundle.exporter as exporter

    monkeypatch.setattr(exporter, "preset_model", lambda *a, **k: pytest.fail("built the model"))
    (tmp_path / "k").write_text("not a key")
    assert "signing key" in one_line(capsys, ["export", "tiny", "--profile", "mixed-demo", "-o", str(tmp_path / "b"),
                                              "--sign", str(tmp_path / "k")])
    assert not (tmp_path / "b").exists()


def test_inspect_help_says_what_it_proves_and_what_it_does_not():
    proc = subprocess.run([sys.executable, "-m", "hetrun", "inspect", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "do not prove who made it" in text and "--trust" in text and "ship only verified" not in text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "## Trust" in readme and "do not prove who made it" in readme and "--rdzv-endpoint" in readme
    assert "127.0.0.1" in readme and "## Limits of what hetrun checks" in readme


def test_a_wrong_passphrase_that_decrypts_to_garbage_is_still_named(bundle, tmp_path, capsys, monkeypatch):
    # About one wrong passphrase in 256 decrypts an encrypted PEM key to bytes that pass the padding check and then
    # fail to parse, with an error that does not mention a password.
    from hetrun.bundle import signing

    monkeypatch.setenv("HETRUN_KEY_PASSPHRASE", "correct horse")
    one_line(capsys, ["keygen", "-o", str(tmp_path / "enc")], code=0)

    def garbage(data, password):
        raise ValueError("Could not deserialize key data. The data may be in an incorrect format")
    monkeypatch.setattr(signing.serialization, "load_pem_private_key", garbage)
    monkeypatch.setenv("HETRUN_KEY_PASSPHRASE", "wrong")
    assert "wrong passphrase" in one_line(capsys, ["sign", str(bundle), "--key", str(tmp_path / "enc")])
