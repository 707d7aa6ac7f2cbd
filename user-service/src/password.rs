//! argon2id password hashing. Hashing is deliberately slow and memory-hungry,
//! so it runs on the blocking pool, never on an async worker.

use argon2::{
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString},
    Algorithm, Argon2, Params, Version,
};

use crate::{domain::Password, error::Error};

#[derive(Clone)]
pub struct Hasher {
    params: Params,
}

impl Hasher {
    /// # Errors
    /// When the memory cost is outside argon2's limits.
    pub fn new(memory_kib: u32) -> anyhow::Result<Self> {
        let params = Params::new(memory_kib, 2, 1, None).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        Ok(Self { params })
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// A PHC string (algorithm, parameters, salt and hash together).
    pub async fn hash(&self, password: Password) -> Result<String, Error> {
        let argon2 = self.argon2();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
            argon2
                .hash_password(password.expose().as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
        })
        .await
        .map_err(|e| anyhow::anyhow!("password hashing task: {e}"))?
        .map_err(Error::from)
    }

    /// Whether `password` matches `stored`. The parameters come from the
    /// stored hash, so hashes made under older settings keep verifying.
    pub async fn verify(&self, password: Password, stored: String) -> Result<bool, Error> {
        let argon2 = self.argon2();
        tokio::task::spawn_blocking(move || {
            let hash = PasswordHash::new(&stored).map_err(|e| anyhow::anyhow!("stored hash is malformed: {e}"))?;
            Ok(argon2.verify_password(password.expose().as_bytes(), &hash).is_ok())
        })
        .await
        .map_err(|e| anyhow::anyhow!("password verification task: {e}"))?
    }
}
