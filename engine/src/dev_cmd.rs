//! `iris certs`, `iris keygen`, `iris token`: development material, so a
//! newcomer can try TLS and JWT logins in three commands (README). Real
//! deployments bring their own CA and token issuer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write into (created; existing files are not overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Names and addresses the server and node certificates are good for.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    pub hosts: Vec<String>,
    /// Node certificates to make (mutual TLS between nodes), one per name.
    #[arg(long, value_delimiter = ',', default_value = "node")]
    pub nodes: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Directory to write into (created; existing files are not overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// The key's id: the files are KID.key and KID.pem, and tokens name it in `kid`.
    #[arg(long, default_value = "iris")]
    pub kid: String,
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The private key (`iris keygen`'s KID.key; Ed25519, P-256 or RSA PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The user the token is for (its `sub`).
    #[arg(long)]
    pub user: String,
    /// Seconds the token stays valid.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
}

fn done(result: Result<(), String>, what: &str) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iris {what}: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn run_certs(args: &CertsArgs) -> ExitCode {
    done(
        certs(&args.out, &args.hosts, &args.nodes).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        }),
        "certs",
    )
}

pub fn run_keygen(args: &KeygenArgs) -> ExitCode {
    done(
        crate::auth::dev::keygen(&args.out, &args.kid).map(|(private, public)| {
            println!("private key (for iris token): {}", private.display());
            println!("public key (for --jwt-keys):  {}", public.display());
        }),
        "keygen",
    )
}

pub fn run_token(args: &TokenArgs) -> ExitCode {
    done(
        crate::auth::dev::token(&args.key, &args.user, args.ttl, crate::auth::now_s())
            .map(|t| println!("{t}")),
        "token",
    )
}

/// A development CA (ca.pem, ca.key), a server certificate for the client
/// listener (server.pem, server.key) and one node certificate per name
/// (NAME.pem, NAME.key; client and server use, for the links between nodes),
/// all for `hosts`. Returns the files written.
pub fn certs(out: &Path, hosts: &[String], nodes: &[String]) -> Result<Vec<PathBuf>, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| format!("cannot make a certificate: {e}");
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut names = vec!["ca".to_string(), "server".to_string()];
    names.extend(nodes.iter().cloned());
    for name in &names {
        for ext in ["pem", "key"] {
            let p = out.join(format!("{name}.{ext}"));
            if p.exists() {
                return Err(format!("{} exists; not overwritten", p.display()));
            }
        }
    }
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name
        .push(DnType::CommonName, "Iris development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let mut written = Vec::new();
    let mut write = |name: &str, cert: &str, key: &KeyPair| -> Result<(), String> {
        let pem = out.join(format!("{name}.pem"));
        let key_path = out.join(format!("{name}.key"));
        std::fs::write(&pem, cert).map_err(|e| format!("{}: {e}", pem.display()))?;
        crate::auth::dev::write_private(&key_path, key.serialize_pem().as_bytes())?;
        written.push(pem);
        written.push(key_path);
        Ok(())
    };
    write("ca", &ca_cert.pem(), &ca_key)?;
    let leaf = |cn: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(sans).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usages;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(err)?;
        Ok::<_, String>((cert.pem(), key))
    };
    let (cert, key) = leaf(
        "iris server",
        hosts.to_vec(),
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    )?;
    write("server", &cert, &key)?;
    for node in nodes {
        let mut sans = hosts.to_vec();
        if !sans.contains(node) {
            sans.push(node.clone());
        }
        let (cert, key) = leaf(
            node,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        write(node, &cert, &key)?;
    }
    Ok(written)
}
