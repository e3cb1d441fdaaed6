//! The PKCS#11 key manager: CA keys generated inside an HSM token that
//! never leave it.
//!
//! Each key is an EC key pair made by `C_GenerateKeyPair` in the token: the
//! private half is `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not
//! `CKA_EXTRACTABLE`, and may only sign; both halves carry the [`KeyId`] as
//! `CKA_LABEL` and `CKA_ID`. Signing is `CKM_ECDSA` over the SHA-2 digest
//! computed here, so any token with plain ECDSA works; the token returns
//! `r || s`, which is what [`CaSigner`] hands out.
//!
//! The module is loaded and `C_Initialize`d once per process. The manager
//! logs in once (PKCS#11 logins belong to the application and last while
//! any of its sessions is open: one session is kept for that) and signs on
//! a pool of sessions. The PIN is read from a file or an environment
//! variable by the caller, used for `C_Login` and dropped (zeroed); it is
//! never logged.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::keys::{CaKey, CaSigner, KeyAlgorithm, KeyId, KeyManager, KeyManagerError};

/// Idle sessions kept for reuse; more are opened under load and closed
/// when they come back to a full pool.
const MAX_IDLE_SESSIONS: usize = 16;

/// DER of the `namedCurve` OIDs (`CKA_EC_PARAMS`).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl KeyAlgorithm {
    fn ec_params(self) -> &'static [u8] {
        match self {
            KeyAlgorithm::EcP256 => P256_PARAMS,
            KeyAlgorithm::EcP384 => P384_PARAMS,
        }
    }

    /// Length of the uncompressed point `04 || x || y`.
    fn point_len(self) -> usize {
        match self {
            KeyAlgorithm::EcP256 => 65,
            KeyAlgorithm::EcP384 => 97,
        }
    }

    fn digest(self, msg: &[u8]) -> ring::digest::Digest {
        match self {
            KeyAlgorithm::EcP256 => ring::digest::digest(&ring::digest::SHA256, msg),
            KeyAlgorithm::EcP384 => ring::digest::digest(&ring::digest::SHA384, msg),
        }
    }
}

/// Where the token is and how to log in.
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Label of the token (as given to `softhsm2-util --init-token --label`).
    pub token_label: String,
    /// The user PIN.
    pub pin: Zeroizing<String>,
}

impl fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .finish()
    }
}

/// Modules loaded and initialised in this process, by path: `C_Initialize`
/// runs once per module and process.
fn module(path: &Path) -> Result<Pkcs11, String> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let ctx = Pkcs11::new(path).map_err(|e| {
        format!("cannot load the module (check the path and that it is a PKCS#11 library): {e}")
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(format!("C_Initialize failed: {}", short(&e))),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// A PKCS#11 error in a few words: the function and the CKR_ name.
fn short(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("{function:?}: CKR {rv:?}"),
        other => other.to_string(),
    }
}

/// What to check for an error, by its return value.
fn hint(e: &P11Error) -> &'static str {
    match e {
        P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _) => {
            "check the PIN in ca.pkcs11.pin_file / pin_env (it is the user PIN, not the SO PIN)"
        }
        P11Error::Pkcs11(RvError::PinLocked, _) => {
            "the user PIN is locked: unlock it with the SO PIN"
        }
        P11Error::Pkcs11(
            RvError::TokenNotPresent
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed,
            _,
        ) => "check that the token is present and reachable, then restart the server",
        P11Error::Pkcs11(RvError::UserNotLoggedIn, _) => {
            "the login was lost (token reset?): restart the server"
        }
        P11Error::Pkcs11(RvError::MechanismInvalid | RvError::MechanismParamInvalid, _) => {
            "the token must support CKM_EC_KEY_PAIR_GEN and CKM_ECDSA on the configured curve"
        }
        _ => "check the token with the vendor's tools (e.g. softhsm2-util --show-slots)",
    }
}

/// One token in one module, logged in.
struct Token {
    ctx: Pkcs11,
    slot: Slot,
    module: PathBuf,
    label: String,
    /// Holds the login: it lasts while any session of the application is
    /// open. Never used for operations.
    _login: Mutex<Session>,
    idle: Mutex<Vec<Session>>,
}

impl Token {
    /// An error naming the module, token and slot, what failed and what to
    /// check.
    fn error(&self, what: &str, e: &P11Error) -> KeyManagerError {
        KeyManagerError::Pkcs11(format!(
            "PKCS#11 module {}, token {:?} (slot {}): {what} failed ({}); {}",
            self.module.display(),
            self.label,
            self.slot.id(),
            short(e),
            hint(e)
        ))
    }

    /// Runs `f` on a pooled session. A session whose operation failed is
    /// closed rather than reused (it may be the session that broke).
    fn with_session<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Session) -> Result<T, P11Error>,
    ) -> Result<T, KeyManagerError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let session = match pooled {
            Some(s) => s,
            None => self
                .ctx
                .open_rw_session(self.slot)
                .map_err(|e| self.error("opening a session", &e))?,
        };
        let out = f(&session).map_err(|e| self.error(what, &e))?;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
        Ok(out)
    }

    /// The one object of `class` labelled `id`, if any.
    fn find(
        &self,
        session: &Session,
        class: ObjectClass,
        id: &KeyId,
    ) -> Result<Option<ObjectHandle>, P11Error> {
        let found = session.find_objects(&[
            Attribute::Class(class),
            Attribute::Label(id.as_str().as_bytes().to_vec()),
        ])?;
        Ok(found.into_iter().next())
    }
}

/// CA keys in a PKCS#11 token.
pub struct Pkcs11KeyManager {
    token: Arc<Token>,
}

impl fmt::Debug for Pkcs11KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyManager")
            .field("module", &self.token.module)
            .field("token_label", &self.token.label)
            .field("slot", &self.token.slot.id())
            .finish()
    }
}

impl Pkcs11KeyManager {
    /// Loads the module, finds the token by label and logs in.
    pub fn open(settings: Pkcs11Settings) -> Result<Self, KeyManagerError> {
        let Pkcs11Settings {
            module: path,
            token_label,
            pin,
        } = settings;
        let fail = |msg: String| {
            KeyManagerError::Pkcs11(format!(
                "PKCS#11 module {}, token {token_label:?}: {msg}",
                path.display()
            ))
        };
        let ctx = module(&path).map_err(fail)?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| fail(format!("listing slots failed: {}", short(&e))))?;
        let mut labels = Vec::new();
        let mut matching = Vec::new();
        for slot in slots {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| fail(format!("reading token info failed: {}", short(&e))))?;
            let label = info.label().trim_end().to_owned();
            if label == token_label {
                matching.push(slot);
            }
            labels.push(label);
        }
        let slot = match matching.as_slice() {
            [slot] => *slot,
            [] => {
                return Err(fail(format!(
                    "no token with this label; the module has tokens {labels:?} (initialise one \
                     with `softhsm2-util --init-token --free --label ...` or the vendor's tool)"
                )));
            }
            _ => {
                return Err(fail(
                    "several tokens have this label; give each a unique label".into(),
                ));
            }
        };
        let login = ctx.open_rw_session(slot).map_err(|e| {
            fail(format!(
                "opening a session on slot {} failed: {}; {}",
                slot.id(),
                short(&e),
                hint(&e)
            ))
        })?;
        let auth = AuthPin::from(pin.as_str().to_owned());
        match login.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                return Err(fail(format!(
                    "login on slot {} failed: {}; {}",
                    slot.id(),
                    short(&e),
                    hint(&e)
                )));
            }
        }
        drop(auth);
        drop(pin);
        tracing::info!(
            module = %path.display(),
            token = %token_label,
            slot = slot.id(),
            "PKCS#11 token logged in for CA keys"
        );
        Ok(Self {
            token: Arc::new(Token {
                ctx,
                slot,
                module: path,
                label: token_label,
                _login: Mutex::new(login),
                idle: Mutex::default(),
            }),
        })
    }

    /// Reads the uncompressed point of the public key object `public`.
    fn public_point(
        &self,
        session: &Session,
        public: ObjectHandle,
        algorithm: KeyAlgorithm,
    ) -> Result<Result<Vec<u8>, String>, P11Error> {
        let attrs =
            session.get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])?;
        let mut params = None;
        let mut point = None;
        for a in attrs {
            match a {
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        if params.as_deref() != Some(algorithm.ec_params()) {
            return Ok(Err(format!("is not a {algorithm:?} key")));
        }
        Ok(point
            .and_then(|p| unwrap_point(&p, algorithm.point_len()))
            .ok_or_else(|| "has no readable uncompressed CKA_EC_POINT".to_owned()))
    }
}

/// `CKA_EC_POINT` is a DER OCTET STRING holding the point (some modules
/// give the bare point): returns the bare uncompressed point.
fn unwrap_point(value: &[u8], len: usize) -> Option<Vec<u8>> {
    let bare = if value.len() == len {
        value
    } else if value.len() == len + 2 && value[0] == 0x04 && usize::from(value[1]) == len {
        &value[2..]
    } else {
        return None;
    };
    (bare[0] == 0x04).then(|| bare.to_vec())
}

impl KeyManager for Pkcs11KeyManager {
    fn generate(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<CaKey, KeyManagerError> {
        let label = id.as_str().as_bytes().to_vec();
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(algorithm.ec_params().to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(label.clone()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Label(label.clone()),
            Attribute::Id(label),
        ];
        let token = &self.token;
        let (private, point) = token.with_session("generating a CA key pair", |s| {
            let (public, private) = s.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )?;
            let point = self.public_point(s, public, algorithm)?;
            Ok((private, point))
        })?;
        let point = point.map_err(|m| KeyManagerError::Invalid(format!("new key {id} {m}")))?;
        tracing::info!(key_id = %id, slot = token.slot.id(), "CA key generated in the PKCS#11 token");
        Ok(Arc::new(Pkcs11Key {
            token: token.clone(),
            id: id.clone(),
            algorithm,
            private,
            point,
        }))
    }

    fn load(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<Option<CaKey>, KeyManagerError> {
        let token = &self.token;
        let found = token.with_session("finding a CA key", |s| {
            let Some(private) = token.find(s, ObjectClass::PRIVATE_KEY, id)? else {
                return Ok(None);
            };
            let point = match token.find(s, ObjectClass::PUBLIC_KEY, id)? {
                Some(public) => self.public_point(s, public, algorithm)?,
                None => Err("has no public key object beside it".to_owned()),
            };
            Ok(Some((private, point)))
        })?;
        let Some((private, point)) = found else {
            return Ok(None);
        };
        let point = point.map_err(|m| KeyManagerError::Invalid(format!("token key {id} {m}")))?;
        Ok(Some(Arc::new(Pkcs11Key {
            token: token.clone(),
            id: id.clone(),
            algorithm,
            private,
            point,
        })))
    }

    fn delete(&self, id: &KeyId) -> Result<(), KeyManagerError> {
        let token = &self.token;
        token.with_session("deleting a CA key", |s| {
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                while let Some(object) = token.find(s, class, id)? {
                    s.destroy_object(object)?;
                }
            }
            Ok(())
        })
    }
}

/// A key in the token.
struct Pkcs11Key {
    token: Arc<Token>,
    id: KeyId,
    algorithm: KeyAlgorithm,
    private: ObjectHandle,
    point: Vec<u8>,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Key({}, {:?})", self.id, self.algorithm)
    }
}

impl CaSigner for Pkcs11Key {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key(&self) -> &[u8] {
        &self.point
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError> {
        let digest = self.algorithm.digest(msg);
        let what = format!("signing with CA key {}", self.id);
        let sig = self.token.with_session(&what, |s| {
            s.sign(&Mechanism::Ecdsa, self.private, digest.as_ref())
        })?;
        if sig.len() != self.point.len() - 1 {
            return Err(KeyManagerError::Sign(format!(
                "{}: the token returned a {}-byte ECDSA signature, not r || s",
                self.id,
                sig.len()
            )));
        }
        Ok(sig)
    }
}

/// Reads a key's attributes as the token reports them (tests check the
/// private key is sensitive and not extractable).
pub fn private_key_flags(
    manager: &Pkcs11KeyManager,
    id: &KeyId,
) -> Result<Option<KeyFlags>, KeyManagerError> {
    let token = &manager.token;
    token.with_session("reading CA key attributes", |s| {
        let Some(private) = token.find(s, ObjectClass::PRIVATE_KEY, id)? else {
            return Ok(None);
        };
        let mut flags = KeyFlags::default();
        for a in s.get_attributes(
            private,
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::KeyType,
            ],
        )? {
            match a {
                Attribute::Token(v) => flags.token = v,
                Attribute::Private(v) => flags.private = v,
                Attribute::Sensitive(v) => flags.sensitive = v,
                Attribute::Extractable(v) => flags.extractable = v,
                Attribute::KeyType(k) => flags.ec = k == KeyType::EC,
                _ => {}
            }
        }
        Ok(Some(flags))
    })
}

/// Boolean attributes of a private key object.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyFlags {
    pub token: bool,
    pub private: bool,
    pub sensitive: bool,
    pub extractable: bool,
    pub ec: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_are_unwrapped_from_der() {
        let mut point = vec![0x04; 65];
        point[1] = 7;
        assert_eq!(unwrap_point(&point, 65).unwrap(), point);
        let mut der = vec![0x04, 65];
        der.extend_from_slice(&point);
        assert_eq!(unwrap_point(&der, 65).unwrap(), point);
        assert!(unwrap_point(&der[..40], 65).is_none());
        assert!(unwrap_point(&[0x02; 65], 65).is_none());
    }

    #[test]
    fn settings_debug_hides_the_pin() {
        let s = Pkcs11Settings {
            module: "/m.so".into(),
            token_label: "t".into(),
            pin: Zeroizing::new("1234".into()),
        };
        assert!(!format!("{s:?}").contains("1234"));
    }
}
