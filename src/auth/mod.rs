//! Authentication: the compiled key store and key extraction from requests.
//! Never logs or stores a plain key; knows nothing of routes beyond their auth policy.

pub mod external;
pub mod extract;
pub mod keys;
