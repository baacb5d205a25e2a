// x402 version 2 from the browser: read the 402's PAYMENT-REQUIRED offer, build the `exact`
// scheme's EIP-3009 TransferWithAuthorization for the wallet to sign, and send it back as
// PAYMENT-SIGNATURE. USDC's EIP-712 name and version come from the offer's `extra`.

export const REQUIRED = "PAYMENT-REQUIRED";
export const SIGNATURE = "PAYMENT-SIGNATURE";
export const RESPONSE = "PAYMENT-RESPONSE";

function decode(header) {
  const bytes = Uint8Array.from(atob(header), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

function encode(value) {
  const bytes = new TextEncoder().encode(JSON.stringify(value));
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

// The `exact` requirement on the relay's network from a 402 response, or null.
export function offerOf(response, network) {
  const header = response.headers.get(REQUIRED);
  if (!header) return null;
  const required = decode(header);
  return (required.accepts || []).find((a) => a.scheme === "exact" && a.network === network.network) || null;
}

export function responseOf(response) {
  const header = response.headers.get(RESPONSE);
  return header ? decode(header) : null;
}

function randomNonce() {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return `0x${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export function authorization(offer, payer) {
  const chainId = Number(offer.network.split(":")[1]);
  return {
    types: {
      EIP712Domain: [
        { name: "name", type: "string" },
        { name: "version", type: "string" },
        { name: "chainId", type: "uint256" },
        { name: "verifyingContract", type: "address" },
      ],
      TransferWithAuthorization: [
        { name: "from", type: "address" },
        { name: "to", type: "address" },
        { name: "value", type: "uint256" },
        { name: "validAfter", type: "uint256" },
        { name: "validBefore", type: "uint256" },
        { name: "nonce", type: "bytes32" },
      ],
    },
    primaryType: "TransferWithAuthorization",
    domain: { name: offer.extra.name, version: offer.extra.version, chainId, verifyingContract: offer.asset },
    message: {
      from: payer,
      to: offer.payTo,
      value: offer.amount,
      validAfter: "0",
      validBefore: String(Math.floor(Date.now() / 1000) + offer.maxTimeoutSeconds),
      nonce: randomNonce(),
    },
  };
}

export function paymentHeader(offer, typedData, signature) {
  return encode({ x402Version: 2, accepted: offer, payload: { signature, authorization: typedData.message } });
}
