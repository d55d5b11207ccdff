//! Signed artifacts: an ed25519 signature over the exact bytes of an
//! artifact's `manifest.json`. The manifest carries the sha256 of every other
//! file, so one signature covers the whole artifact.
//!
//! Files:
//!
//! * `manifest.sig` beside `manifest.json`, JSON:
//!   `{"algorithm":"ed25519","key_id":"<16 hex>","signature":"<128 hex>"}`.
//! * A public key file: one line `ed25519-public <64 hex>` (the 32-byte key).
//! * A secret key file: one line `ed25519-secret <64 hex>` (the 32-byte seed),
//!   created with mode 0600.
//!
//! In key files, blank lines and lines starting with `#` are ignored. A key's
//! id is the first 16 hex digits of the sha256 of its 32 public key bytes.
//!
//! Publishers create a key pair with [`generate_keypair`] and sign with
//! [`sign_artifact`]; operators list trusted public keys and check an artifact
//! with [`verify_artifact`] or load it with
//! [`crate::LoadedModel::load_dir_signed`].

use std::io::{Read, Write};
use std::path::Path;

pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ModelError;
pub use crate::error::SigningError;
use crate::files::{parse_manifest, read_verified_files};
pub use crate::manifest::SIGNATURE_FILE;
use crate::manifest::{MANIFEST_FILE, Manifest};

/// The only signature algorithm, as named in `manifest.sig`.
pub const ALGORITHM: &str = "ed25519";

/// First word of a public key file's key line.
pub const PUBLIC_KEY_TAG: &str = "ed25519-public";

/// First word of a secret key file's key line.
pub const SECRET_KEY_TAG: &str = "ed25519-secret";

/// The contents of `manifest.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// Id of the signing key ([`key_id`]), 16 lowercase hex digits.
    pub key_id: String,
    /// The 64-byte signature over `manifest.json`, as 128 lowercase hex digits.
    pub signature: String,
}

/// A public key the operator trusts to sign models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// The key's id ([`key_id`]).
    pub key_id: String,
    /// The key.
    pub key: VerifyingKey,
}

impl TrustedKey {
    /// A trusted key with its id computed.
    pub fn new(key: VerifyingKey) -> Self {
        Self {
            key_id: key_id(&key),
            key,
        }
    }
}

/// The outcome of a successful [`verify_artifact`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Id of the trusted key that signed the artifact.
    pub key_id: String,
    /// The verified manifest.
    pub manifest: Manifest,
}

/// A key's id: the first 16 hex digits of the sha256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let mut id = hex::encode(Sha256::digest(key.as_bytes()));
    id.truncate(16);
    id
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SigningError + '_ {
    move |source| SigningError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> SigningError {
    SigningError::KeyFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn sig_error(path: &Path, reason: impl Into<String>) -> SigningError {
    SigningError::SignatureFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// 32 bytes from the operating system's random source.
fn random_seed() -> Result<[u8; 32], SigningError> {
    let path = Path::new("/dev/urandom");
    let mut seed = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io(path))?;
    Ok(seed)
}

/// Create a new file that does not exist yet; `secret` files get mode 0600.
fn create_new(path: &Path, secret: bool) -> Result<std::fs::File, SigningError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            SigningError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            SigningError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Create a key pair: the secret key (mode 0600) at `secret_path` and the
/// public key at `public_path`. Refuses to overwrite either file. Returns the
/// key id.
pub fn generate_keypair(secret_path: &Path, public_path: &Path) -> Result<String, SigningError> {
    for path in [secret_path, public_path] {
        if path.exists() {
            return Err(SigningError::Exists {
                path: path.to_path_buf(),
            });
        }
    }
    let mut seed = random_seed()?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let verifying = key.verifying_key();
    let id = key_id(&verifying);
    let secret_text = format!(
        "# Outpost model signing key {id} (secret: keep it private)\n{SECRET_KEY_TAG} {}\n",
        hex::encode(key.as_bytes())
    );
    let public_text = format!(
        "# Outpost model signing key {id} (public: give it to operators)\n{PUBLIC_KEY_TAG} {}\n",
        hex::encode(verifying.as_bytes())
    );
    let mut secret = create_new(secret_path, true)?;
    if let Err(e) = secret.write_all(secret_text.as_bytes()) {
        let _ = std::fs::remove_file(secret_path);
        return Err(io(secret_path)(e));
    }
    let public = create_new(public_path, false)
        .and_then(|mut f| f.write_all(public_text.as_bytes()).map_err(io(public_path)));
    if let Err(e) = public {
        // Leave no secret key behind without its public half.
        let _ = std::fs::remove_file(secret_path);
        return Err(e);
    }
    Ok(id)
}

/// The 32 bytes of the single `tag` line of a key file.
fn parse_key_line(text: &str, tag: &str, path: &Path) -> Result<[u8; 32], SigningError> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (word, value) = (words.next().unwrap_or(""), words.next());
        if word != tag {
            return Err(key_error(
                path,
                format!(
                    "line {}: expected `{tag} <64 hex digits>`, found {:?}",
                    i + 1,
                    word.chars().take(20).collect::<String>()
                ),
            ));
        }
        let (Some(value), None) = (value, words.next()) else {
            return Err(key_error(
                path,
                format!("line {}: expected `{tag} <64 hex digits>`", i + 1),
            ));
        };
        if found.is_some() {
            return Err(key_error(path, format!("line {}: a second key", i + 1)));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(value, &mut bytes).map_err(|_| {
            key_error(
                path,
                format!(
                    "line {}: the key must be 64 hex digits (32 bytes), found {} characters",
                    i + 1,
                    value.len()
                ),
            )
        })?;
        found = Some(bytes);
    }
    found.ok_or_else(|| key_error(path, format!("no `{tag}` line")))
}

fn read_text(path: &Path) -> Result<String, SigningError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Read a secret key file (`ed25519-secret <64 hex>`).
pub fn read_secret_key(path: &Path) -> Result<SigningKey, SigningError> {
    let text = read_text(path)?;
    let mut seed = parse_key_line(&text, SECRET_KEY_TAG, path)?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Ok(key)
}

fn public_key_from(text: &str, path: &Path) -> Result<TrustedKey, SigningError> {
    let bytes = parse_key_line(text, PUBLIC_KEY_TAG, path)?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| key_error(path, "not a valid ed25519 public key"))?;
    if key.is_weak() {
        return Err(key_error(
            path,
            "a weak (small-order) ed25519 public key is never trusted",
        ));
    }
    Ok(TrustedKey::new(key))
}

/// Read a public key file (`ed25519-public <64 hex>`).
pub fn read_public_key(path: &Path) -> Result<TrustedKey, SigningError> {
    public_key_from(&read_text(path)?, path)
}

/// Parse the text of a public key file (or the single line
/// `ed25519-public <64 hex>`, e.g. from a configuration file).
pub fn parse_public_key(text: &str) -> Result<TrustedKey, SigningError> {
    public_key_from(text, Path::new("<text>"))
}

fn read_manifest_bytes(dir: &Path) -> Result<Vec<u8>, SigningError> {
    let path = dir.join(MANIFEST_FILE);
    std::fs::read(&path)
        .map_err(|source| ModelError::Io { path, source })
        .map_err(SigningError::from)
}

/// Sign the artifact in `dir` with `key`, writing `manifest.sig` (replacing
/// any earlier one). The manifest must be valid and every file it lists must
/// match its hash: a broken artifact is never signed.
pub fn sign_artifact(dir: &Path, key: &SigningKey) -> Result<SignatureFile, SigningError> {
    let manifest_bytes = read_manifest_bytes(dir)?;
    let origin = dir.join(MANIFEST_FILE).display().to_string();
    let manifest = parse_manifest(&manifest_bytes, &origin)?;
    read_verified_files(dir, &manifest)?;
    let signature = key.sign(&manifest_bytes);
    let file = SignatureFile {
        algorithm: ALGORITHM.to_string(),
        key_id: key_id(&key.verifying_key()),
        signature: hex::encode(signature.to_bytes()),
    };
    let path = dir.join(SIGNATURE_FILE);
    let text = serde_json::to_string_pretty(&file)
        .map_err(|e| sig_error(&path, format!("cannot encode: {e}")))?;
    // Never half a signature, even after a power cut.
    outpost_storage::fsutil::write_atomic(&path, (text + "\n").as_bytes()).map_err(io(&path))?;
    Ok(file)
}

/// Read and check `manifest.sig` of `dir`.
pub fn read_signature(dir: &Path) -> Result<SignatureFile, SigningError> {
    let path = dir.join(SIGNATURE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SigningError::Unsigned {
                dir: dir.to_path_buf(),
            });
        }
        Err(source) => return Err(SigningError::Io { path, source }),
    };
    let file: SignatureFile =
        serde_json::from_slice(&bytes).map_err(|e| sig_error(&path, e.to_string()))?;
    signature_bytes(&file).map_err(|reason| sig_error(&path, reason))?;
    Ok(file)
}

/// The 64 signature bytes of a well-formed signature (algorithm, key id and
/// signature checked); otherwise what is wrong.
fn signature_bytes(file: &SignatureFile) -> Result<[u8; Signature::BYTE_SIZE], String> {
    if file.algorithm != ALGORITHM {
        return Err(format!(
            "algorithm {:?} is not supported (expected {ALGORITHM:?})",
            file.algorithm
        ));
    }
    if file.key_id.len() != 16 || !file.key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("key_id must be 16 hex digits".into());
    }
    let mut sig = [0u8; Signature::BYTE_SIZE];
    hex::decode_to_slice(&file.signature, &mut sig)
        .map_err(|_| "signature must be 128 hex digits (64 bytes)".to_string())?;
    Ok(sig)
}

/// Why [`verify_bytes`] refuses a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BytesSignatureError {
    /// The signature is not well formed (algorithm, key id, hex digits).
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// It names a key that is not among the trusted keys.
    #[error("signed by key {key_id}, which is not a trusted key")]
    UntrustedKey {
        /// Id of the key named by the signature.
        key_id: String,
    },
    /// It names a trusted key but does not verify over the bytes.
    #[error("the signature of key {key_id} does not match: the content was modified after signing")]
    BadSignature {
        /// Id of the key named by the signature.
        key_id: String,
    },
}

/// Sign `bytes` that are not an artifact (for example the canonical bytes of
/// a fleet document), in the same format as `manifest.sig`.
pub fn sign_bytes(bytes: &[u8], key: &SigningKey) -> SignatureFile {
    SignatureFile {
        algorithm: ALGORITHM.to_string(),
        key_id: key_id(&key.verifying_key()),
        signature: hex::encode(key.sign(bytes).to_bytes()),
    }
}

/// Check that `sig` is a signature by one of `trusted` over `bytes`
/// (strict ed25519 verification, as for artifacts); returns the key's id.
pub fn verify_bytes(
    bytes: &[u8],
    sig: &SignatureFile,
    trusted: &[TrustedKey],
) -> Result<String, BytesSignatureError> {
    let raw = signature_bytes(sig).map_err(BytesSignatureError::Malformed)?;
    let key_id = sig.key_id.to_ascii_lowercase();
    let Some(key) = trusted.iter().find(|k| k.key_id == key_id) else {
        return Err(BytesSignatureError::UntrustedKey { key_id });
    };
    key.key
        .verify_strict(bytes, &Signature::from_bytes(&raw))
        .map_err(|_| BytesSignatureError::BadSignature {
            key_id: key_id.clone(),
        })?;
    Ok(key_id)
}

/// Check that `manifest_bytes` (the exact bytes of `dir`'s manifest.json) are
/// signed by one of `trusted`; returns the signing key's id. File hashes are
/// not checked here.
pub fn verify_manifest_bytes(
    dir: &Path,
    manifest_bytes: &[u8],
    trusted: &[TrustedKey],
) -> Result<String, SigningError> {
    let file = read_signature(dir)?;
    let key_id = file.key_id.to_ascii_lowercase();
    let Some(key) = trusted.iter().find(|k| k.key_id == key_id) else {
        return Err(SigningError::UntrustedKey { key_id });
    };
    let mut sig = [0u8; Signature::BYTE_SIZE];
    hex::decode_to_slice(&file.signature, &mut sig).map_err(|_| {
        sig_error(
            &dir.join(SIGNATURE_FILE),
            "signature must be 128 hex digits (64 bytes)",
        )
    })?;
    key.key
        .verify_strict(manifest_bytes, &Signature::from_bytes(&sig))
        .map_err(|_| SigningError::BadSignature {
            dir: dir.to_path_buf(),
            key_id: key_id.clone(),
        })?;
    Ok(key_id)
}

/// Verify the artifact in `dir`: `manifest.sig` must be a valid signature of
/// one of `trusted` over manifest.json, and every file the manifest lists must
/// match its hash (a mismatch is [`SigningError::Artifact`] holding
/// [`ModelError::Checksum`]).
pub fn verify_artifact(dir: &Path, trusted: &[TrustedKey]) -> Result<Verified, SigningError> {
    let manifest_bytes = read_manifest_bytes(dir)?;
    let key_id = verify_manifest_bytes(dir, &manifest_bytes, trusted)?;
    let origin = dir.join(MANIFEST_FILE).display().to_string();
    let manifest = parse_manifest(&manifest_bytes, &origin)?;
    read_verified_files(dir, &manifest)?;
    Ok(Verified { key_id, manifest })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoadedModel;
    use burn::tensor::Device;

    fn copy_bundled(dir: &Path) {
        for f in ["manifest.json", "model.bpk"] {
            std::fs::copy(Path::new(crate::bundled::DIR).join(f), dir.join(f)).unwrap();
        }
    }

    /// A fresh key pair in `dir`: (secret key, trusted public key).
    fn keys(dir: &Path, name: &str) -> (SigningKey, TrustedKey) {
        let (s, p) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pub")),
        );
        let id = generate_keypair(&s, &p).unwrap();
        let public = read_public_key(&p).unwrap();
        assert_eq!(public.key_id, id);
        (read_secret_key(&s).unwrap(), public)
    }

    fn signed_artifact() -> (tempfile::TempDir, tempfile::TempDir, TrustedKey) {
        let art = tempfile::tempdir().unwrap();
        let keydir = tempfile::tempdir().unwrap();
        copy_bundled(art.path());
        let (secret, public) = keys(keydir.path(), "publisher");
        let sig = sign_artifact(art.path(), &secret).unwrap();
        assert_eq!(sig.key_id, public.key_id);
        (art, keydir, public)
    }

    #[test]
    fn sign_then_verify() {
        let (art, _keys, public) = signed_artifact();
        let v = verify_artifact(art.path(), std::slice::from_ref(&public)).unwrap();
        assert_eq!(v.key_id, public.key_id);
        assert_eq!(v.manifest.name, "basicmotions-fcn");
        let text = std::fs::read_to_string(art.path().join(SIGNATURE_FILE)).unwrap();
        let file: SignatureFile = serde_json::from_str(&text).unwrap();
        assert_eq!(file.algorithm, "ed25519");
        assert_eq!(file.key_id.len(), 16);
        assert_eq!(file.signature.len(), 128);
    }

    #[test]
    fn tampered_weights_after_signing_are_refused() {
        let (art, _keys, public) = signed_artifact();
        let path = art.path().join("model.bpk");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 3] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let err = verify_artifact(art.path(), &[public]).unwrap_err();
        match &err {
            SigningError::Artifact(e) => assert!(
                matches!(**e, ModelError::Checksum { ref file, .. } if file == "model.bpk"),
                "{e}"
            ),
            other => panic!("expected a checksum error, got {other}"),
        }
    }

    #[test]
    fn manifest_edited_after_signing_is_refused() {
        let (art, _keys, public) = signed_artifact();
        let path = art.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"version\": \"", "\"version\": \"9", 1);
        assert_ne!(text, edited);
        std::fs::write(&path, edited).unwrap();
        let err = verify_artifact(art.path(), std::slice::from_ref(&public)).unwrap_err();
        match &err {
            SigningError::BadSignature { key_id, .. } => assert_eq!(*key_id, public.key_id),
            other => panic!("expected BadSignature, got {other}"),
        }
        assert!(err.to_string().contains("modified after signing"), "{err}");
    }

    #[test]
    fn untrusted_key_is_refused_naming_it() {
        let (art, keydir, public) = signed_artifact();
        let (_, other) = keys(keydir.path(), "other");
        let err = verify_artifact(art.path(), &[other]).unwrap_err();
        match &err {
            SigningError::UntrustedKey { key_id } => assert_eq!(*key_id, public.key_id),
            other => panic!("expected UntrustedKey, got {other}"),
        }
        assert!(err.to_string().contains(&public.key_id), "{err}");
        // No trusted key at all: the same refusal.
        assert!(matches!(
            verify_artifact(art.path(), &[]),
            Err(SigningError::UntrustedKey { .. })
        ));
    }

    #[test]
    fn signature_claiming_a_trusted_key_id_is_refused() {
        // Signed by an attacker's key, but the file names the trusted key's id.
        let (art, keydir, public) = signed_artifact();
        let (attacker, _) = keys(keydir.path(), "attacker");
        let forged = sign_artifact(art.path(), &attacker).unwrap();
        let file = SignatureFile {
            key_id: public.key_id.clone(),
            ..forged
        };
        std::fs::write(
            art.path().join(SIGNATURE_FILE),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify_artifact(art.path(), &[public]),
            Err(SigningError::BadSignature { .. })
        ));
    }

    #[test]
    fn unsigned_is_refused() {
        let art = tempfile::tempdir().unwrap();
        copy_bundled(art.path());
        let keydir = tempfile::tempdir().unwrap();
        let (_, public) = keys(keydir.path(), "k");
        let err = verify_artifact(art.path(), &[public]).unwrap_err();
        assert!(matches!(err, SigningError::Unsigned { .. }), "{err}");
        assert!(err.to_string().contains("not signed"), "{err}");
    }

    #[test]
    fn malformed_signature_files_are_clear_errors() {
        let (art, _keys, public) = signed_artifact();
        let path = art.path().join(SIGNATURE_FILE);
        let good: SignatureFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "expected"),
            (
                serde_json::to_vec(&SignatureFile {
                    algorithm: "rsa".into(),
                    ..good.clone()
                })
                .unwrap(),
                "algorithm \"rsa\"",
            ),
            (
                serde_json::to_vec(&SignatureFile {
                    signature: "abcd".into(),
                    ..good.clone()
                })
                .unwrap(),
                "128 hex digits",
            ),
            (
                serde_json::to_vec(&SignatureFile {
                    key_id: "xyz".into(),
                    ..good.clone()
                })
                .unwrap(),
                "16 hex digits",
            ),
        ];
        for (bytes, needle) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = verify_artifact(art.path(), std::slice::from_ref(&public)).unwrap_err();
            assert!(
                matches!(err, SigningError::SignatureFile { .. }),
                "{needle}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(needle) && msg.contains("manifest.sig"),
                "{msg}"
            );
        }
    }

    #[test]
    fn broken_artifact_is_not_signed() {
        let art = tempfile::tempdir().unwrap();
        copy_bundled(art.path());
        std::fs::write(art.path().join("model.bpk"), b"garbage").unwrap();
        let keydir = tempfile::tempdir().unwrap();
        let (secret, _) = keys(keydir.path(), "k");
        let err = sign_artifact(art.path(), &secret).unwrap_err();
        assert!(
            matches!(&err, SigningError::Artifact(e) if matches!(**e, ModelError::Checksum { .. })),
            "{err}"
        );
        assert!(!art.path().join(SIGNATURE_FILE).exists());
    }

    #[test]
    fn key_files_round_trip_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let (s, p) = (dir.path().join("k.key"), dir.path().join("k.pub"));
        let id = generate_keypair(&s, &p).unwrap();
        assert_eq!(id.len(), 16);
        let secret = read_secret_key(&s).unwrap();
        let public = read_public_key(&p).unwrap();
        assert_eq!(secret.verifying_key(), public.key);
        assert_eq!(key_id(&public.key), id);
        // The same key parsed from text, comments and blank lines ignored.
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with('#'));
        assert_eq!(
            parse_public_key(&format!("\n{text}\n# end\n")).unwrap(),
            public
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&s).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        // Never overwritten.
        let before = std::fs::read(&s).unwrap();
        let err = generate_keypair(&s, &dir.path().join("new.pub")).unwrap_err();
        assert!(matches!(err, SigningError::Exists { .. }), "{err}");
        let err = generate_keypair(&dir.path().join("new.key"), &p).unwrap_err();
        assert!(matches!(err, SigningError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&s).unwrap(), before);
        assert!(!dir.path().join("new.key").exists());
        // Two key pairs differ.
        let id2 = generate_keypair(&dir.path().join("b.key"), &dir.path().join("b.pub")).unwrap();
        assert_ne!(id, id2);
    }

    #[test]
    fn malformed_key_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (s, p) = (dir.path().join("k.key"), dir.path().join("k.pub"));
        generate_keypair(&s, &p).unwrap();
        // A secret key where a public one is expected.
        let err = read_public_key(&s).unwrap_err();
        assert!(matches!(err, SigningError::KeyFile { .. }), "{err}");
        assert!(err.to_string().contains("ed25519-public"), "{err}");
        let err = parse_public_key("ed25519-public 1234").unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let err = parse_public_key("# nothing\n").unwrap_err();
        assert!(
            err.to_string().contains("no `ed25519-public` line"),
            "{err}"
        );
        let line = std::fs::read_to_string(&p).unwrap();
        let err = parse_public_key(&format!("{line}{line}")).unwrap_err();
        assert!(err.to_string().contains("a second key"), "{err}");
        // The identity point is a weak key.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let err = parse_public_key(&format!("ed25519-public {}", hex::encode(weak))).unwrap_err();
        assert!(err.to_string().contains("weak"), "{err}");
        let err = read_secret_key(&dir.path().join("missing.key")).unwrap_err();
        assert!(matches!(err, SigningError::Io { .. }), "{err}");
    }

    #[test]
    fn load_dir_signed_loads_the_bundled_model() {
        let (art, keydir, public) = signed_artifact();
        let device = Device::flex();
        let (model, id) =
            LoadedModel::load_dir_signed(art.path(), &device, std::slice::from_ref(&public))
                .unwrap();
        assert_eq!(id, public.key_id);
        assert_eq!(model.manifest().name, "basicmotions-fcn");
        let (_, other) = keys(keydir.path(), "other");
        let err = LoadedModel::load_dir_signed(art.path(), &device, &[other]).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::Signature(SigningError::UntrustedKey { .. })
            ),
            "{err}"
        );
        // Tampered weights: the plain checksum error.
        let path = art.path().join("model.bpk");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0x80;
        std::fs::write(&path, bytes).unwrap();
        let err = LoadedModel::load_dir_signed(art.path(), &device, &[public]).unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
        // Unsigned.
        let plain = tempfile::tempdir().unwrap();
        copy_bundled(plain.path());
        let (_, k) = keys(keydir.path(), "third");
        let err = LoadedModel::load_dir_signed(plain.path(), &device, &[k]).unwrap_err();
        assert!(
            matches!(err, ModelError::Signature(SigningError::Unsigned { .. })),
            "{err}"
        );
    }
}
