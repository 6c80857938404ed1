"""Credentials against the Resource Manager fake in every cloud: workload identity federation, Microsoft
Entra ID's refusals, tokens bound to an audience, the cloud metadata document in both api-versions, and the
record of where each token was asked for."""
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.identity import ClientSecretCredential, DefaultAzureCredential, WorkloadIdentityCredential
from azure.mgmt.compute import ComputeManagementClient

from fake_arm import ARM_SCOPE, DEFAULT_SUBSCRIPTION, JWT_BEARER, FakeArm
from conftest import azure_env
from test_fake_arm import raw_get, small_estate

SUB = DEFAULT_SUBSCRIPTION


@pytest.fixture
def fake(monkeypatch):
    """A fake and an environment that trusts it, with no credential variables at all."""
    with FakeArm(small_estate(), page_size=2) as fake:
        azure_env(monkeypatch)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_pem_path)
        monkeypatch.setenv("SSL_CERT_FILE", fake.ca_pem_path)
        yield fake


def token_post(fake, tenant: str, form: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{fake.url}/{tenant}/oauth2/v2.0/token",
                                     data=urllib.parse.urlencode(form).encode(), method="POST")
    context = ssl.create_default_context(cafile=fake.ca_pem_path)
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class TestWorkloadIdentity:
    def test_default_credential_exchanges_the_federated_token(self, fake, tmp_path, monkeypatch):
        variables = fake.env_workload_identity(tmp_path / "token")
        assert set(variables) == {"AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE",
                                  "AZURE_AUTHORITY_HOST"}
        assert (tmp_path / "token").read_text() == fake.federated_token
        assert variables["AZURE_AUTHORITY_HOST"] == fake.url
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
        credential = DefaultAzureCredential()
        assert credential.get_token(ARM_SCOPE).token == fake.token
        compute = ComputeManagementClient(credential, SUB, base_url=fake.url, credential_scopes=[ARM_SCOPE])
        assert len(list(compute.virtual_machine_scale_sets.list_all())) == 2
        [asked] = fake.token_requests
        assert asked == (
            "aad_token", fake.url, fake.tenant_id, "client_credentials", fake.client_id,
            "https://management.azure.com/", 200, "assertion")
        assert fake.counts["openid"] == 0   # azure-identity posts the assertion without discovery

    def test_an_assertion_entra_id_has_no_federation_for_is_refused(self, fake, tmp_path):
        fake.env_workload_identity(tmp_path / "token")
        (tmp_path / "token").write_text(fake.federated_token + "x")
        credential = WorkloadIdentityCredential(tenant_id=fake.tenant_id, client_id=fake.client_id,
                                                token_file_path=str(tmp_path / "token"), authority=fake.url)
        with pytest.raises(ClientAuthenticationError, match="AADSTS70021: No matching federated identity record"):
            credential.get_token(ARM_SCOPE)
        assert [r.status for r in fake.token_requests] == [401]

    def test_the_token_file_is_read_for_every_new_token(self, fake, tmp_path):
        fake.env_workload_identity(tmp_path / "token")
        credential = WorkloadIdentityCredential(tenant_id=fake.tenant_id, client_id=fake.client_id,
                                                token_file_path=str(tmp_path / "token"), authority=fake.url)
        assert credential.get_token(ARM_SCOPE).token == fake.token
        fake.federated_token = "rotated"              # Kubernetes rotates the projected token
        (tmp_path / "token").write_text("rotated")
        other = WorkloadIdentityCredential(tenant_id=fake.tenant_id, client_id=fake.client_id,
                                           token_file_path=str(tmp_path / "token"), authority=fake.url)
        assert other.get_token(ARM_SCOPE).token == fake.token


class TestEntraRefusals:
    def form(self, fake, **changes) -> dict:
        return {"client_id": fake.client_id, "grant_type": "client_credentials", "scope": ARM_SCOPE,
                "client_assertion_type": JWT_BEARER, "client_assertion": fake.federated_token, **changes}

    def test_the_exact_request_is_accepted(self, fake):
        status, body = token_post(fake, fake.tenant_id, self.form(fake))
        assert status == 200 and body["access_token"] == fake.token and body["token_type"] == "Bearer"

    @pytest.mark.parametrize("changes, status, error, code", [
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"scope": "https://management.azure.com/user_impersonation"}, 400, "invalid_scope", 1002012),
        ({"client_id": "00000000-0000-0000-0000-00000000beef"}, 400, "unauthorized_client", 700016),
        ({"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"}, 400,
         "invalid_request", 700002),
        ({"client_assertion": "eyJ.forged.jwt"}, 401, "invalid_client", 70021),
    ])
    def test_refusals_in_entra_ids_words(self, fake, changes, status, error, code):
        got, body = token_post(fake, fake.tenant_id, self.form(fake, **changes))
        assert (got, body["error"], body["error_codes"]) == (status, error, [code])
        assert body["error_description"].startswith(f"AADSTS{code}: ") and "access_token" not in body

    def test_neither_secret_nor_assertion(self, fake):
        form = {"client_id": fake.client_id, "grant_type": "client_credentials", "scope": ARM_SCOPE}
        assert token_post(fake, fake.tenant_id, form)[1]["error_codes"] == [7000218]
        assert token_post(fake, fake.tenant_id, {**form, "client_secret": fake.client_secret})[0] == 200

    def test_an_unknown_tenant(self, fake):
        status, body = token_post(fake, "00000000-0000-0000-0000-00000000dead", self.form(fake))
        assert (status, body["error"], body["error_codes"]) == (400, "invalid_tenant", [90002])
        status, body = raw_get(fake, "/some-tenant/v2.0/.well-known/openid-configuration")
        assert status == 400 and body["error"] == "invalid_tenant"


class TestAudience:
    def test_a_token_for_another_resource_is_refused_by_resource_manager(self, fake):
        credential = ClientSecretCredential(fake.tenant_id, fake.client_id, fake.client_secret,
                                            authority=fake.url, disable_instance_discovery=True)
        graph_token = credential.get_token("https://graph.microsoft.com/.default").token
        assert graph_token != fake.token
        assert credential.get_token("https://management.core.windows.net//.default").token == fake.token
        status, body = raw_get(fake, f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines"
                                     "?api-version=2026-04-01", {"Authorization": f"Bearer {graph_token}"})
        assert (status, body["error"]["code"]) == (401, "InvalidAuthenticationTokenAudience")
        assert "'https://graph.microsoft.com'" in body["error"]["message"]

    def test_the_cloud_audiences_decide(self, fake, monkeypatch):
        fake.cloud_audiences = ["https://management.fake.example/"]
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        credential = DefaultAzureCredential()
        assert credential.get_token("https://management.fake.example/.default").token == fake.token
        compute = ComputeManagementClient(credential, SUB, base_url=fake.url, credential_scopes=[ARM_SCOPE],
                                          retry_total=0)
        with pytest.raises(HttpResponseError) as caught:   # the public cloud's audience is not this cloud's
            list(compute.virtual_machine_scale_sets.list_all())
        assert caught.value.status_code == 401 and caught.value.error.code == "InvalidAuthenticationTokenAudience"
        assert [(r.endpoint, r.audience, r.credential) for r in fake.token_requests] == [
            ("token", "https://management.fake.example", "managed_identity"),
            ("token", "https://management.azure.com", "managed_identity")]


class TestCloudMetadata:
    def test_both_api_versions_of_the_public_cloud(self, fake):
        status, current = raw_get(fake, "/metadata/endpoints?api-version=2022-09-01")
        assert status == 200 and current["resourceManager"] == f"{fake.url}/"
        assert current["authentication"]["loginEndpoint"] == f"{fake.url}/"
        status, older = raw_get(fake, "/metadata/endpoints?api-version=2015-01-01")
        assert status == 200 and older == {
            "galleryEndpoint": f"{fake.url}/", "graphEndpoint": f"{fake.url}/", "portalEndpoint": f"{fake.url}/",
            "authentication": {"loginEndpoint": f"{fake.url}/", "audiences": fake.cloud_audiences}}
        assert raw_get(fake, "/metadata/endpoints?api-version=2019-05-01")[0] == 400
        assert raw_get(fake, "/metadata/endpoints")[1]["error"]["code"] == "MissingApiVersionParameter"

    def test_azure_stack_hub_answers_2015_01_01_only(self, fake):
        fake.metadata_versions = ("2015-01-01",)
        status, body = raw_get(fake, "/metadata/endpoints?api-version=2022-09-01")
        assert (status, body["error"]["code"]) == (400, "InvalidApiVersionParameter")
        assert "'2015-01-01'" in body["error"]["message"]
        status, body = raw_get(fake, "/metadata/endpoints?api-version=2015-01-01")
        assert status == 200 and set(body) == {"galleryEndpoint", "graphEndpoint", "portalEndpoint", "authentication"}


class TestWhereTokensCameFrom:
    def test_a_token_asked_of_the_fake_authority_is_recorded_with_it(self, fake):
        variables = fake.env_client_secret()
        assert set(variables) == {"AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"}
        credential = ClientSecretCredential(*variables.values(), authority=fake.url, disable_instance_discovery=True)
        credential.get_token(ARM_SCOPE)
        [asked] = fake.token_requests
        assert (asked.endpoint, asked.authority, asked.tenant, asked.credential, asked.status) == (
            "aad_token", fake.url, fake.tenant_id, "secret", 200)
        assert fake.requests[-1].host == fake.url.removeprefix("https://")

    def test_the_managed_identity_endpoint_is_recorded_too(self, fake, monkeypatch):
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        DefaultAzureCredential().get_token(ARM_SCOPE)
        assert [(r.endpoint, r.authority, r.credential) for r in fake.token_requests] == [
            ("token", fake.url, "managed_identity")]
        fake.reset_counts()
        assert fake.token_requests == []
