"""Bundle signatures: an Ed25519 signature over manifest.json with a key the user holds.

The manifest lists the sha256 and size of every other file of a bundle, so a signature over its exact bytes covers
the whole bundle: zeroed weights, an edited generation_config.json or a swapped graph change a digest, hence the
manifest, hence the signature. The checksums alone prove only that a bundle is intact, not who made it: anyone who
edits a bundle can recompute them. `hetrun run --trust KEY.pub` refuses a bundle that no trusted key signed.

    manifest.sig    {"format": "hetrun-bundle-signature", "version": 1, "algorithm": "ed25519",
                     "key": "sha256:<hex of the raw public key's sha256>", "signature": "<base64>"}

The signed message is SIGNED_PREFIX + the bytes of manifest.json (a prefix, so a signature made with the same key
for anything else never passes as a bundle's). Keys are PEM (PKCS#8 private, SubjectPublicKeyInfo public, as
`hetrun keygen` and `openssl genpkey -algorithm ed25519` write them) or OpenSSH (`ssh-keygen -t ed25519`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hetrun.errors import BundleError, HetrunError

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "hetrun-bundle-signature"
SIGNED_PREFIX = b"hetrun-bundle-signature v1\n"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_BYTES = 64 * 1024
PASSPHRASE_ENV = "HETRUN_KEY_PASSPHRASE"  # read for an encrypted private key, and by `hetrun keygen` to encrypt one


def fingerprint(key: Ed25519PublicKey) -> str:
    """`sha256:<hex>` of the raw 32-byte public key: how hetrun names a key in signatures and messages."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _read_key_file(path: "str | os.PathLike", what: str) -> bytes:
    p = Path(path)
    try:
        if not p.is_file():
            raise HetrunError(f"{what} '{p}' not found; make a key pair with `hetrun keygen -o KEY`")
        if p.stat().st_size > MAX_KEY_BYTES:
            raise HetrunError(f"{what} '{p}' is larger than {MAX_KEY_BYTES} bytes; not a key file")
        return p.read_bytes()
    except OSError as e:
        raise HetrunError(f"cannot read {what} '{p}': {e.strerror or e}") from None


def load_private_key(path: "str | os.PathLike") -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM or OpenSSH file (encrypted ones with $HETRUN_KEY_PASSPHRASE)."""
    data = _read_key_file(path, "signing key")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    pw = passphrase.encode() if passphrase else None
    loader = serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data else \
        serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
    key, why = None, "not a private key file"
    try:
        key = loader(data, password=pw)
    except TypeError as e:  # encrypted without a passphrase, or a passphrase for a plain key
        why = (f"it is encrypted: set {PASSPHRASE_ENV}" if pw is None else
               f"it is not encrypted: unset {PASSPHRASE_ENV}") if "password" in str(e).lower() else str(e)[:80]
    except (ValueError, UnsupportedAlgorithm) as e:
        # a wrong passphrase usually fails the decryption, but about one time in 256 it decrypts to bytes that pass
        # the padding check and then fail to parse: an encrypted PEM file says so in its header either way
        wrong = pw is not None and ("password" in str(e).lower() or b"ENCRYPTED" in data)
        why = f"wrong passphrase in {PASSPHRASE_ENV}" if wrong else "not a private key file"
    if key is None:
        raise HetrunError(f"signing key '{path}': cannot read it ({why}); give the private key `hetrun keygen` or "
                          "`openssl genpkey -algorithm ed25519` wrote")
    if not isinstance(key, Ed25519PrivateKey):
        raise HetrunError(f"signing key '{path}' is a {type(key).__name__.removeprefix('_')}, not Ed25519; "
                          "bundles are signed with Ed25519 keys (`hetrun keygen -o KEY`)")
    return key


def load_public_key(path: "str | os.PathLike") -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or an OpenSSH `ssh-ed25519 ...` line."""
    data = _read_key_file(path, "trusted key")
    if b"PRIVATE KEY" in data:
        raise HetrunError(f"trusted key '{path}' is a private key; give its public half (KEY.pub), and keep the "
                          "private key with whoever signs")
    key = None
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip().split(b"\n")[0])
        elif b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm, binascii.Error):
        pass
    if key is None:
        raise HetrunError(f"trusted key '{path}' is not a public key file (PEM or OpenSSH); give the KEY.pub that "
                          "`hetrun keygen` wrote")
    if not isinstance(key, Ed25519PublicKey):
        raise HetrunError(f"trusted key '{path}' is not an Ed25519 key; bundles are signed with Ed25519 keys")
    return key


def trusted_keys(paths) -> dict[str, Ed25519PublicKey]:
    """Fingerprint -> key for every trusted public key file (or key object) in `paths`."""
    keys = [p if isinstance(p, Ed25519PublicKey) else load_public_key(p) for p in paths]
    if not keys:
        raise HetrunError("no trusted key given; pass the signer's public key (KEY.pub)")
    return {fingerprint(k): k for k in keys}


def signature_document(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The bytes of manifest.sig for manifest.json's bytes."""
    doc = {"format": SIGNATURE_FORMAT, "version": 1, "algorithm": "ed25519", "key": fingerprint(key.public_key()),
           "signature": base64.b64encode(key.sign(SIGNED_PREFIX + manifest_bytes)).decode()}
    return (json.dumps(doc, indent=1) + "\n").encode()


def parse_signature(data: bytes) -> dict:
    """manifest.sig's fields (format checked, signature not), or a one-line BundleError."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        doc = None
    ok = isinstance(doc, dict) and doc.get("format") == SIGNATURE_FORMAT and doc.get("version") == 1 and \
        doc.get("algorithm") == "ed25519" and isinstance(doc.get("key"), str) and \
        isinstance(doc.get("signature"), str) and len(doc["key"]) <= 80 and len(doc["signature"]) <= 200
    if not ok:
        raise BundleError(f"{SIGNATURE}: is not a hetrun bundle signature (format {SIGNATURE_FORMAT} version 1, "
                          "ed25519)")
    try:
        doc["raw"] = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise BundleError(f"{SIGNATURE}: the signature is not base64") from None
    return doc


def verify_signature(manifest_bytes: bytes, signature: bytes | None, trusted: dict[str, Ed25519PublicKey]) -> str:
    """The fingerprint of the trusted key that signed exactly these manifest bytes, or a one-line BundleError."""
    if signature is None:
        raise BundleError(f"the bundle is not signed ({SIGNATURE} is missing) and a trusted signature is required; "
                          "sign it with `hetrun sign BUNDLE --key KEY` (or export with --sign KEY), or run "
                          "without --trust only if you trust where it came from")
    doc = parse_signature(signature)
    key = trusted.get(doc["key"])
    if key is None:
        raise BundleError(f"{SIGNATURE}: the bundle is signed by key {doc['key'][:80]}, which is not among the "
                          f"{len(trusted)} trusted key{'s' if len(trusted) > 1 else ''} "
                          f"({', '.join(k[:19] + '...' for k in trusted)}); refusing it")
    try:
        key.verify(doc["raw"], SIGNED_PREFIX + manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{SIGNATURE}: the signature by trusted key {doc['key'][:19]}... does not match "
                          "manifest.json: the bundle was changed after it was signed; refusing it") from None
    return doc["key"]


def generate_key_pair(private_path: "str | os.PathLike") -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (PEM, mode 0600, encrypted when $HETRUN_KEY_PASSPHRASE is set) and its
    public half beside it as `<private>.pub`; refuses to replace either. Returns (private, public, fingerprint)."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise HetrunError(f"'{p}' already exists; hetrun never overwrites a key: choose another -o")
    if not private_path.parent.is_dir():
        raise HetrunError(f"cannot write '{private_path}': folder '{private_path.parent}' does not exist")
    key = Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    enc = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private, 0o600)
    try:
        _write_new(public_path, public, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path, fingerprint(key.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, whole or not at all, with `mode` from the first byte on."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    except OSError as e:
        raise HetrunError(f"cannot write '{path}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never replaces a key
    except FileExistsError:
        raise HetrunError(f"'{path}' already exists; hetrun never overwrites a key: choose another -o") from None
    except OSError as e:
        raise HetrunError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def sign_folder(folder: Path, key: Ed25519PrivateKey) -> None:
    """Write SIGNATURE beside the folder's finished manifest.json."""
    with open(folder / SIGNATURE, "wb") as f:
        f.write(signature_document((folder / "manifest.json").read_bytes(), key))
